"""A real 2-process data-parallel run on CPU (torchrun, gloo) through the same `train` entry."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from tinyllama_ft import generate, load_for_inference

pytestmark = pytest.mark.slow


def test_two_processes_train_disjoint_rows_and_write_one_complete_run(tmp_path):
    """Without CUDA and without --use_cpu (what a user types): the processes form one CPU run (gloo)."""
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not on PATH")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(ROOT / "tests" / "ddp_probe.py"),
           "--preset", "smoke", "--output_dir", str(out), "--max_steps", "4",
           "--gradient_accumulation_steps", "1", "--num_train_epochs", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    seen = [set(json.loads((out / f"seen-rank{rank}.json").read_text(encoding="utf-8"))) for rank in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "each process must train on its own rows"
    returned = [json.loads((out / f"returned-rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    assert all(r["run_complete"] for r in returned), f"train returned before the run folder was complete: {returned}"

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 4
    assert metrics["effective_batch_size"] == 2 * 1 * 2
    assert metrics["eval_tokens"] == metrics["base_eval_tokens"] > 0  # all validation rows, counted once
    assert len(json.loads((out / "generations.json").read_text(encoding="utf-8"))["tuned"]) == 8
    model, tokenizer = load_for_inference(str(out), device="cpu")
    assert isinstance(generate(model, tokenizer, "Name a color.", max_new_tokens=4)["text"], str)
    assert result.stderr.count("settings other than the defaults:") == 1, "only the main process logs"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_start_with_two_cpu_processes(name, tmp_path):
    """Each shipped accelerate config trains 2 steps with 2 CPU processes and writes a loadable run."""
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install deepspeed")
    accelerate = shutil.which("accelerate") or pytest.skip("accelerate not on PATH")
    out = tmp_path / name
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{name}.yaml"),
           "--main_process_port", "29519", "-m", "tinyllama_ft", "train", "--preset", "smoke", "--use_cpu", "true",
           "--max_steps", "2", "--num_generate", "2", "--output_dir", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 2
    model, _ = load_for_inference(str(out), device="cpu")
    assert sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n) > 0
