"""A run stopped at any point ends in a state from which the next command finishes it with the same
adapter as an uninterrupted run; checkpoints and run folders are never half-trusted; no two
messages contradict each other.

Each interrupted run is stopped at a known point: `pause_probe.py` runs the real command line and
waits at that point for the signal, so no test races a fast run."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import ROOT
from tinyllama_ft import parse_config
from tinyllama_ft.storage.run_folder import check_output_dir, resume_path, training_folder
from tinyllama_ft.storage.saved_model import check_saved_folder
from tinyllama_ft.cli import main
from tinyllama_ft.errors import UserError

RUN = ["--preset", "smoke", "--max_steps", "8", "--save_steps", "2", "--eval_steps", "100", "--num_generate", "0"]
RESUME = ["--resume_from_checkpoint", "true"]


def train(out, *extra):
    cmd = [sys.executable, "-m", "tinyllama_ft", "train", *RUN, "--output_dir", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def stop_at(stage, signum, out, tmp_path, *extra, finished_before=False):
    """Start the run, wait until it is paused at `stage`, send `signum`; return its stderr."""
    marker = tmp_path / "paused"
    cmd = [sys.executable, str(ROOT / "tests" / "pause_probe.py"), stage, str(marker), "train", *RUN,
           "--output_dir", str(out), *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert process.poll() is None, f"run ended before reaching {stage}: {process.stderr.read()[-2000:]}"
            assert time.time() < deadline, f"run did not reach {stage} in 300 s"
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # never leave a paused run behind
            process.kill()
            process.wait()
    assert process.returncode != 0 and (finished_before or not (out / "metrics.json").exists())
    return err


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out)
    return adapter(out)


# (stage, signal, a complete checkpoint exists afterwards). Checkpoints every 2 of 8 steps.
STOPS = [
    ("base-evaluation", signal.SIGTERM, False),
    ("step-1", signal.SIGINT, False),  # before the first checkpoint
    ("saving-checkpoint-2", signal.SIGKILL, False),  # while the first one is written: .tmp-checkpoint-2 left
    ("checkpoint-4", signal.SIGINT, True),  # between checkpoints, for each way a run is stopped
    ("checkpoint-4", signal.SIGTERM, True),
    ("checkpoint-4", signal.SIGKILL, True),
    ("saving-checkpoint-6", signal.SIGKILL, True),  # while a later one is written
    ("final-evaluation", signal.SIGINT, True),
    ("final-save", signal.SIGKILL, True),  # .tmp-final left, 3 final files already moved in
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, signum, resumable", STOPS,
                         ids=[f"{s}-{signal.Signals(n).name.lower()}" for s, n, _ in STOPS])
def test_a_stopped_run_finishes_with_the_same_adapter(stage, signum, resumable, reference, tmp_path, capsys):
    out = tmp_path / "run"
    err = stop_at(stage, signum, out, tmp_path)
    if signum != signal.SIGKILL:
        hints = re.findall(r"interrupted: [^\r\n]*", err)  # after a progress bar, maybe on its line
        assert len(hints) == 1, err[-2000:]
        hint = hints[0]
        assert ("--resume_from_checkpoint true" in hint) == resumable, hint
        assert ("run the same command again" in hint) == (not resumable), hint
    if resumable:  # the same command says what to add, and with it the run finishes
        assert main(["train", *RUN, "--output_dir", str(out)]) == 2
        assert "unfinished run: pass --resume_from_checkpoint true" in capsys.readouterr().err
        newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))
        train(out, *RESUME)
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))  # what this command did, of the run's 8 steps
        assert (metrics["train_steps"], metrics["train_steps_run"]) == (8, 8 - state["global_step"])
        if metrics["train_steps_run"]:  # this command's tokens over this command's time, not the run's
            assert metrics["train_tokens_per_second"] * metrics["train_runtime"] == pytest.approx(
                metrics["train_tokens"] - state["num_input_tokens_seen"])
    elif stage == "base-evaluation":  # nothing to lose; asking to resume just starts, and says so
        assert "no checkpoint in" in train(out, *RESUME)
    else:  # nothing to lose: the same command simply runs again
        train(out)
    assert not list(out.glob(".tmp-*")), "staging leftovers are removed"
    resumed = adapter(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] - reference[name]).abs().max() <= 1e-6, name


@pytest.mark.slow
def test_a_run_stopped_after_its_last_checkpoint_trains_no_step_more(tmp_path):
    """Stopped in its final evaluation, a run resumes from the checkpoint of its last step. transformers alone then
    trains a 9th step of the 8 (with a constant learning rate, an adapter 1e-3 away from the uninterrupted run's);
    here nothing more is trained, the adapter is the uninterrupted run's and metrics.json says what happened."""
    constant = ("--lr_scheduler_type", "constant")
    reference, out = tmp_path / "reference", tmp_path / "run"
    train(reference, *constant)
    stop_at("final-evaluation", signal.SIGKILL, out, tmp_path, *constant)
    err = train(out, *constant, *RESUME)
    assert f"{out / 'checkpoint-8'} is the run's last step (8): nothing is left to train" in err
    expected, resumed = adapter(reference), adapter(out)
    assert max((resumed[name] - expected[name]).abs().max() for name in expected) <= 1e-6
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["train_steps"], metrics["train_steps_run"]) == (8, 0)
    assert metrics["train_loss"] is None and metrics["train_tokens_per_second"] is None
    assert metrics["train_tokens"] == json.loads((reference / "metrics.json").read_text(encoding="utf-8"))["train_tokens"]
    assert not (out / "checkpoint-9").exists()


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".tmp-checkpoint-6").mkdir()  # what a crash during the save of step 6 leaves
    config = parse_config(RUN + ["--output_dir", str(tmp_path), *RESUME])
    assert resume_path(config) == str(tmp_path / "checkpoint-3")


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, caplog):
    config = parse_config(RUN + ["--output_dir", str(tmp_path / "new"), *RESUME])
    assert resume_path(config) is None
    with caplog.at_level("INFO"):
        check_output_dir(config)
    assert "no checkpoint in" in caplog.text and "starting from the beginning" in caplog.text


def test_a_folder_with_nothing_to_lose_is_used_as_it_is(tmp_path):
    """A notebook's plots (written before training) and staging leftovers are not a run."""
    for name in ("categories.png", "lengths.png", "loss_mask.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    (tmp_path / ".tmp-checkpoint-2" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / ".tmp-final").mkdir()
    check_output_dir(parse_config(RUN + ["--output_dir", str(tmp_path)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["categories.png", "lengths.png", "loss_mask.png"]


def test_overwrite_deletes_nothing_before_the_new_run_is_complete(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}", encoding="utf-8")
    (tmp_path / "metrics.json").write_text("{}", encoding="utf-8")
    config = parse_config(RUN + ["--output_dir", str(tmp_path), "--overwrite_output_dir", "true"])
    check_output_dir(config)
    assert (tmp_path / "checkpoint-3").exists() and (tmp_path / "metrics.json").exists()
    assert training_folder(config) == tmp_path.with_name(f".{tmp_path.name}.replacing")


def test_a_swap_stopped_between_its_renames_is_completed_by_the_next_command(tmp_path):
    out = tmp_path / "run"
    new, old = tmp_path / ".run.replacing", tmp_path / ".run.replaced"
    for folder, tag in ((new, "new"), (old, "old")):
        folder.mkdir()
        (folder / "metrics.json").write_text(tag, encoding="utf-8")
    (new / "adapter_model.safetensors").write_text("", encoding="utf-8")
    check_output_dir(parse_config(RUN + ["--output_dir", str(out), "--overwrite_output_dir", "true"]))
    assert (out / "metrics.json").read_text(encoding="utf-8") == "new" and not new.exists() and not old.exists()
    (new).mkdir()  # the new one incomplete: the old one goes back
    old.mkdir()
    (old / "metrics.json").write_text("old", encoding="utf-8")
    shutil.rmtree(out)
    check_saved_folder_or_none(out)
    assert (out / "metrics.json").read_text(encoding="utf-8") == "old" and not old.exists()


def check_saved_folder_or_none(path):
    try:
        check_saved_folder(path)
    except UserError:
        pass


def run_files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run, and the same command with another seed: the run that replaces it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(out)
    return out, run_files(out)


# The worst moments to stop a run that replaces a finished one: while it saves (its training is all written,
# the old run still in place), and between the two renames that swap it in. SIGKILL: nothing of ours runs after it.
REPLACE_STOPS = ["final-save", "swap"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", REPLACE_STOPS)
def test_overwrite_stopped_at_the_worst_moment_loses_neither_run(stage, finished, tmp_path, capsys):
    original, files = finished
    out = tmp_path / "run"
    shutil.copytree(original, out)
    replace = ["--overwrite_output_dir", "true", "--seed", "7"]
    stop_at(stage, signal.SIGKILL, out, tmp_path, *replace, finished_before=True)
    if stage == "swap":  # the old run is aside, the new one complete: the next command puts the new one in place
        assert not out.exists()
        assert main(["generate", "--adapter", str(out), "--instruction", "Hi.", "--max_new_tokens", "2"]) == 0
        assert (out / "metrics.json").is_file() and run_files(out) != files
    else:  # the old run is untouched, byte for byte, and the same command replaces it
        assert run_files(out) == files
        train(out, *replace)
        assert run_files(out)["adapter_model.safetensors"] != files["adapter_model.safetensors"]
    assert (out / "metrics.json").is_file()
    assert not list(tmp_path.glob(".run.*")) and not list(out.glob(".tmp-*")), "no leftovers beside or inside"


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    config = parse_config(RUN + ["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(tmp_path)])
    with pytest.raises(UserError, match="is not a checkpoint"):
        resume_path(config)
