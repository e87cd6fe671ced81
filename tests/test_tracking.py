"""Experiment tracking (`--report_to`): TensorBoard and trackio log a smoke run offline, the loss of every logged
step read back with their own readers; a tracker that is not installed, or not one transformers knows, is one line
before anything loads."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tinyllama_ft import parse_config, parse_dpo_config
from tinyllama_ft.cli import main as cli_main
from tinyllama_ft.errors import UserError
from tinyllama_ft.storage.run_folder import foreign_files


def logged_losses(run) -> dict[int, float]:
    history = json.loads((run / "log_history.json").read_text(encoding="utf-8"))
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def hide(monkeypatch, module: str) -> None:
    """`module` looks uninstalled to the check (importlib finds no spec for it)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == module
                        else find_spec(name, *args))


@pytest.mark.parametrize("tracker, package", [("tensorboard", "tensorboard"), ("trackio", "trackio")])
def test_a_tracker_that_is_not_installed_is_one_line_naming_the_install(tracker, package, monkeypatch, capsys):
    hide(monkeypatch, package)
    assert cli_main(["train", "--preset", "smoke", "--report_to", tracker, "--output_dir", "unused"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --report_to {tracker}: {package} is not installed: pip install {package} "
                     "(or pip install -e '.[track]' in the checkout)"]


def test_an_unknown_tracker_is_refused_before_anything_loads():
    with pytest.raises(UserError, match="--report_to tensorbored: not a tracker transformers knows: use tensorboard, "
                                        "trackio, none or one of .*wandb"):
        parse_config(preset="smoke", report_to="tensorbored")
    assert parse_config(preset="smoke", report_to="none").report_to == []
    with pytest.raises(UserError, match="--report_to tensorbored: not a tracker transformers knows"):
        parse_dpo_config(["--adapter", "runs/smoke", "--report_to", "tensorbored"])  # DPO's settings too


@pytest.mark.slow
def test_tensorboard_gets_the_loss_of_every_logged_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "smoke"
    assert cli_main(["train", "--preset", "smoke", "--output_dir", str(run), "--report_to", "tensorboard"]) == 0
    events = sorted((run / "runs").glob("*/events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    scalars = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    expected = logged_losses(run)
    assert sorted(scalars) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert all(scalars[step] == pytest.approx(loss, rel=1e-6) for step, loss in expected.items())
    assert "eval/loss" in accumulator.Tags()["scalars"]
    assert foreign_files(run) == []  # runs/ is the run's own: --overwrite_output_dir and resume accept the folder


@pytest.mark.slow
def test_trackio_keeps_the_run_in_its_local_store_offline(tmp_path):
    pytest.importorskip("trackio")
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1")
    run = tmp_path / "smoke"
    train = subprocess.run([sys.executable, "-m", "tinyllama_ft", "train", "--preset", "smoke", "--output_dir", str(run),
                            "--report_to", "trackio", "--project", "tinyllama-ft-test"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    read = ("import json, trackio\nfrom trackio.sqlite_storage import SQLiteStorage\n"
            "runs = list(trackio.Api().runs('tinyllama-ft-test'))\n"
            "logs = SQLiteStorage.get_logs('tinyllama-ft-test', runs[0].name)\n"
            "print(json.dumps({'runs': len(runs), 'lr': runs[0].config['learning_rate'], "
            "'loss': {row['train/global_step']: row['train/loss'] for row in logs if 'train/loss' in row}}))")
    stored = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert stored.returncode == 0, stored.stderr[-3000:]
    found = json.loads(stored.stdout.strip().splitlines()[-1])
    expected = logged_losses(run)
    assert found["runs"] == 1 and found["lr"] == pytest.approx(1e-3)
    assert {int(step): loss for step, loss in found["loss"].items()} == pytest.approx(expected)
    assert list((tmp_path / "trackio").glob("*.db")), "trackio's local store is its SQLite file in TRACKIO_DIR"
