"""Shared fixtures. Real assets come from `TINYLLAMA_ASSETS` (default `../shared/assets`);
tests that need them skip with the reason when they are absent (a user's fresh clone)."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TINYLLAMA_ASSETS", ROOT.parent / "shared" / "assets"))


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


FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261201"))


def pytest_report_header(config):
    return f"fuzz seed: {FUZZ_SEED} (FUZZ_SEED={FUZZ_SEED} replays the hypothesis and schemathesis runs)"
