"""Shared fixtures. Real assets come from `TINYLLAMA_ASSETS` (default `../shared/assets`);
tests that need them skip with the reason when they are absent (a user's fresh clone)."""

import json
import locale
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TINYLLAMA_ASSETS", ROOT.parent / "shared" / "assets"))


def as_printed(text: str) -> str:
    """`text` as a command prints it on this environment's console (its child processes inherit it): what the
    console's encoding lacks becomes "?" (`settings/console.py`); on a UTF-8 console, `text` itself."""
    encoding = (os.environ.get("PYTHONIOENCODING") or locale.getpreferredencoding(False)).split(":")[0]
    return text.encode(encoding, "replace").decode(encoding)


def asset(name: str) -> Path:
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"offline asset {path} not found (set TINYLLAMA_ASSETS to the shared assets folder)")
    return path


@pytest.fixture(scope="session")
def tinyllama_tokenizer():
    from tinyllama_ft import load_tokenizer

    return load_tokenizer(str(asset("tinyllama-tokenizer")))


@pytest.fixture(scope="session")
def stories_dir() -> str:
    return str(asset("stories260k"))


@pytest.fixture(scope="session")
def dolly_path() -> str:
    return str(asset("dolly/dolly-sample-1109.jsonl"))


@pytest.fixture(scope="session")
def dolly_rows(dolly_path):
    return [json.loads(line) for line in open(dolly_path, encoding="utf-8")]


# Under pytest-xdist (the README's `-n 2`) each worker, and every process it starts, computes on one thread:
# two workers on two cores, not four threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    if "torch" in sys.modules:  # a plugin imported it before this file: the variable came too late for it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The longest files go to the workers first (loadfile hands files out in collection order), so that no worker
# is left alone with a 6-minute file at the end. Measured with --durations: the GPU check's dry run ~6 min, DPO ~5.
FIRST = ["test_gpu_check.py", "test_dpo.py", "test_reliability.py", "test_harness.py"]


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261201"))


def pytest_report_header(config):
    return f"fuzz seed: {FUZZ_SEED} (FUZZ_SEED={FUZZ_SEED} replays the hypothesis and schemathesis runs)"
