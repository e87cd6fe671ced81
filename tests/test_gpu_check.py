"""scripts/gpu_check.py proves itself on CPU before any GPU sees it: `--dry-run` runs every step at tiny shapes
(the steps that need CUDA must end in the project's one-line refusal) and writes its three files."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, asset

STEPS = ["versions", "bench, 12 GB cap", "bench, uncapped", "train bf16", "train fp16", "QLoRA", "Liger on and off",
         "notebook"]


@pytest.mark.slow  # every step on CPU: two small benches, two tiny trainings with export, the smoke notebook (~4 min)
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    asset("tinyllama-tokenizer"), asset("tinyllama-1.1b-config"), asset("dolly/dolly-sample-1109.jsonl")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget", "2400"], cwd=ROOT, capture_output=True, text=True, timeout=2700)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    results = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert list(results) == STEPS and all(r["status"] == "ok" for r in results.values()), results
    assert results["versions"]["packages"]["trl"] and results["versions"]["device"] == "CPU"
    assert results["bench, 12 GB cap"]["candidates"]["default_checkpointing"]["configuration"]["gradient_checkpointing"]
    assert results["bench, uncapped"]["default"]["configuration"]["gradient_checkpointing"] is False  # auto: fits
    trained = results["train bf16"]
    assert trained["train_loss"] > 0 and "model.safetensors" in trained["export_files"]
    assert trained["gradient_dtypes"] == ["torch.float32"] and trained["base_dtype"] == "torch.bfloat16"  # bf16 on CPU
    for name in ("train fp16", "QLoRA", "Liger on and off"):
        assert "needs a CUDA GPU" in results[name]["refused"]
    assert results["notebook"]["cells"] > 10 and "metrics.json" in results["notebook"]["metrics"]
    table = (out / "gpu_check.md").read_text(encoding="utf-8")
    assert all(f"## {name}" in table for name in STEPS)
