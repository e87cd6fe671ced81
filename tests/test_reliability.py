"""Interrupted runs resume to the same adapter; checkpoints and run folders are never half-trusted."""

import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import ROOT
from tinyllama_ft import parse_config
from tinyllama_ft.errors import UserError
from tinyllama_ft.artifacts import resume_path

RUN = ["--preset", "smoke", "--max_steps", "12", "--save_steps", "3", "--eval_steps", "100", "--num_generate", "0"]


def train(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "tinyllama_ft", "train", *RUN, "--output_dir", str(out), *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    return process


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out)
    return adapter(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "term", "kill"])
def test_interrupted_run_resumes_to_the_same_adapter(signum, reference, tmp_path):
    out = tmp_path / "run"
    process = train(out, wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoint-6").is_dir():
        assert process.poll() is None and time.time() < deadline, "run ended before its 2nd checkpoint"
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and not (out / "metrics.json").exists()
    if signum != signal.SIGKILL:
        assert "--resume_from_checkpoint true" in err
    refused = subprocess.run([sys.executable, "-m", "tinyllama_ft", "train", *RUN, "--output_dir", str(out)],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "unfinished run" in refused.stderr
    train(out, "--resume_from_checkpoint", "true")
    resumed = adapter(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] - reference[name]).abs().max() <= 1e-6, name


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / ".tmp-checkpoint-6").mkdir()  # what a crash during the save of step 6 leaves
    config = parse_config(RUN + ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"])
    assert resume_path(config) == str(tmp_path / "checkpoint-3")


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    config = parse_config(RUN + ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"])
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        resume_path(config)
