"""`python -m tinyllama_ft bench`: the CPU preset end to end in a reduced form, and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllama_ft.bench.compare import GIB, KEYS, SEED, _add_mfu, assets_dir, format_table, main
from tinyllama_ft.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = assets_dir() / "tinyllama-tokenizer"
needs_tokenizer = pytest.mark.skipif(
    not TOKENIZER.is_dir(),
    reason=f"the real TinyLlama tokenizer is not under {assets_dir()} (set TINYLLAMA_ASSETS); the cpu bench "
           "would need the hub")


@pytest.mark.slow  # two training subprocesses on the real tokenizer: ~1-3 minutes on 2 cores
@needs_tokenizer
def test_cpu_bench_end_to_end_reduced(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = main(["--preset", "cpu", "--rows", "16", "--out", str(out)])  # one optimizer step of 16 rows each
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(report))
    for name in ("baseline", "default"):
        assert set(KEYS) <= set(data[name])
        for key in KEYS:
            assert isinstance(data[name][key], (int, float)) and data[name][key] >= 0, (name, key)
        assert data[name]["steps"] == 1 and data[name]["real_tokens_per_second"] > 0
        assert data[name]["peak_memory_bytes"] > 100 * 2 ** 20  # a Python process with torch: > 100 MiB
    assert isinstance(data["speedup"], float)
    assert data["speedup"] == pytest.approx(data["default"]["real_tokens_per_second"]
                                            / data["baseline"]["real_tokens_per_second"])
    assert data["baseline"]["padding_share"] > 0.1
    assert data["default"]["padding_share"] <= 0.05
    # the same real tokens, fed as the same rows in the same micro-batches
    assert data["default"]["real_tokens"] == data["baseline"]["real_tokens"] > 16 * 20
    assert data["default"]["same_micro_batches_as_baseline"]
    assert data["baseline"]["configuration"]["gradient_checkpointing"] is True
    assert data["default"]["configuration"]["padding_free"] is True
    assert data["baseline"]["configuration"]["lm_head_labelled_only"] is False  # the seed scored every position
    assert data["default"]["configuration"]["lm_head_labelled_only"] is True
    table = capsys.readouterr().out
    assert "baseline (seed)" in table and "default" in table and "speedup" in table


def test_the_default_keeps_the_seed_batches():
    """What changes is how a micro-batch is laid out and computed, not which rows make a step."""
    from tinyllama_ft.settings.config import Config

    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "train_sampling_strategy"):
        assert defaults[key] == SEED[key]
    assert SEED["per_device_train_batch_size"] * SEED["gradient_accumulation_steps"] == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the gpu preset would run")
def test_gpu_preset_without_cuda_is_a_one_line_error():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        main(["--preset", "gpu"])
    # and through the command line: exit 2, one line on stderr
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.run([sys.executable, "-m", "tinyllama_ft", "bench", "--preset", "gpu"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith("error: bench --preset gpu needs a CUDA GPU")


@pytest.mark.parametrize("args, message", [
    ([], "--preset"),
    (["--preset", "tpu"], "invalid choice"),
    (["--preset", "cpu", "--rows", "1"], "--rows must be >= 2"),
    (["--preset", "cpu", "--repeat", "0"], "--repeat must be >= 1"),
    (["--preset", "cpu", "--out", "/no/such/folder/bench.json"], "does not exist"),
])
def test_bad_arguments_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        main(args)


def _fake_result(tokens_per_second: float, padding: float, reserved_gib: float) -> dict:
    return {"real_tokens_per_second": tokens_per_second, "padding_share": padding,
            "peak_memory_bytes": int(reserved_gib * GIB), "worst_case_peak_memory_bytes": int(reserved_gib * GIB),
            "seconds_per_step": 1.0, "steps": 68, "real_tokens_per_cpu_second": tokens_per_second,
            "runtime_seconds": 10.0, "real_tokens": int(tokens_per_second * 10), "sum_squared_row_lengths": 10 ** 8,
            "same_micro_batches_as_baseline": True, "same_row_order_as_baseline": True, "threads": 16,
            "train_loss": 10.0}


def test_gpu_report_mfu_and_12gb_verdict():
    """The gpu preset's arithmetic and table, without a GPU: MFU = (4 N T + 6 d layers sum L^2) / time / peak."""
    prepared = {"matmul_parameters": 10 ** 9, "hidden_size": 2048, "num_hidden_layers": 22,
                "bf16_matmul_peak_flops": 1e15}
    baseline, default = _fake_result(10_000, 0.3, 3.0), _fake_result(20_000, 0.0, 11.8)
    for result in (baseline, default):
        _add_mfu(result, prepared)
    expected = (4 * 10 ** 9 * 100_000 + 6 * 2048 * 22 * 10 ** 8) / 10.0 / 1e15
    assert baseline["mfu"] == pytest.approx(expected)
    assert baseline["fits_12gb"] and not default["fits_12gb"]  # 11.8 GiB + 0.5 GiB context > 12 GiB
    report = {"preset": "gpu", "device": "NVIDIA H100", "model": "TinyLlama-1.1B shape", "rows": 1088,
              "dataset": "dolly-sample-1109.jsonl", "baseline": baseline, "default": default, "speedup": 2.0}
    table = format_table(report)
    assert "MFU" in table and f"{baseline['mfu']:.1%}" in table
    assert "baseline (seed) yes, default NO" in table
