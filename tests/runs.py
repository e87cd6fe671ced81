"""Fine-tuned runs shared by the chat, serve and card tests: each is trained once per test process,
through the real command line, into a temporary folder removed at exit."""

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT, asset

_TMP = Path(tempfile.mkdtemp(prefix="tinyllama-ft-runs-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


@functools.lru_cache(maxsize=None)
def stories_run() -> Path:
    """The real pretrained stories260k, fine-tuned 10 steps on 96 real Dolly rows (~30 s on 2 CPU cores)."""
    out = _TMP / "stories"
    cli("train", "--model_name_or_path", asset("stories260k"), "--dataset_name", asset("dolly/dolly-sample-1109.jsonl"),
        "--output_dir", out, "--max_length", 512, "--train_size", 96, "--eval_size", 16, "--test_size", 16,
        "--num_generate", 4, "--max_new_tokens", 16, "--max_steps", 10, "--gradient_checkpointing", "false", "--per_device_train_batch_size", 8,
        "--gradient_accumulation_steps", 1, "--learning_rate", "3e-3", "--logging_steps", 5, "--eval_steps", 1000,
        "--save_steps", 1000, "--precision", "fp32", "--lora_r", 8, "--lora_alpha", 16)
    return out


@functools.lru_cache(maxsize=None)
def smoke_run() -> Path:
    out = _TMP / "smoke"
    cli("train", "--preset", "smoke", "--output_dir", out)
    return out
