"""Shared fixtures. Real assets come from `TINYLLAMA_ASSETS` (default `../shared/assets`);
tests that need them skip with the reason when they are absent (a user's fresh clone)."""

import fnmatch
import json
import locale
import os
import shutil
import sys
import tempfile
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


@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp's Python binding; CI installs it and sets REQUIRE_LLAMA_CPP=1, so there a missing one fails."""
    if os.environ.get("REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                               "llama-cpp-python==0.3.36 builds llama.cpp from source, about 5 minutes)")


SMOKE_RUN = ["--preset", "smoke", "--max_steps", "2", "--num_generate", "0"]  # a finished run in seconds


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-step smoke run, made by the real command line (`SMOKE_RUN`)."""
    import subprocess

    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", "train", *SMOKE_RUN, "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


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


# The files CI also runs on the lowest versions pyproject.toml allows (`pytest -m lowest` in .ci/run's second
# environment): the data and labels, a training smoke run, evaluation and generation, save and reload, the
# assumptions on other packages. Add a file here to run it there too.
LOWEST = ["test_data.py", "test_tokenization.py", "test_eos.py", "test_formats.py", "test_model.py", "test_training.py",
          "test_evaluate.py", "test_saved_model.py", "test_assumptions.py", "test_lora_variants.py",
          "test_serve.py"]


def pytest_ignore_collect(collection_path, config):
    """`-m lowest` reads only the LOWEST files: the others may import packages the lowest install leaves out."""
    if config.getoption("markexpr") == "lowest" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py" and collection_path.name not in LOWEST:
        return True
    return None


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))
    for item in items:
        if item.path.name in LOWEST:
            item.add_marker("lowest")


FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261201"))


def pytest_report_header(config):
    return f"fuzz seed: {FUZZ_SEED} (FUZZ_SEED={FUZZ_SEED} replays the hypothesis and schemathesis runs)"


# Every process of the test session (xdist workers and the commands the tests start inherit TMPDIR) writes its
# temporary files into one fresh folder, which must hold nothing of ours when the session ends: the controller
# checks it after all workers are done (`pytest_sessionfinish`), then removes it.
OWN_TEMP = "TINYLLAMA_TESTS_TEMP"  # not TINYLLAMA_FT_*: those are configuration variables
NOT_OURS = ["pytest-of-*", "torchinductor_*",  # pytest's tmp_path, torch's compile cache
            "torchelastic_*",  # torchrun's own folder of each multi-process run
            "tinyllama-ft-runs-*", "tinyllama-ft-dpo-*"]  # tests/runs.py's and test_dpo.py's shared runs, removed
                                                          # when their worker exits (after this check may run)
if OWN_TEMP not in os.environ:
    os.environ[OWN_TEMP] = os.environ["TMPDIR"] = os.environ["TEMP"] = os.environ["TMP"] = tempfile.mkdtemp(
        prefix="tinyllama-ft-tests-")
    os.environ[OWN_TEMP + "_OWNER"] = str(os.getpid())
    tempfile.tempdir = None  # read TMPDIR again


def pytest_sessionfinish(session, exitstatus):
    temp = Path(os.environ[OWN_TEMP])
    if os.environ.get(OWN_TEMP + "_OWNER") != str(os.getpid()) or not temp.is_dir():
        return  # a worker, or a session started inside another one
    left = sorted(p.name for p in temp.iterdir() if not any(fnmatch.fnmatch(p.name, n) for n in NOT_OURS))
    shutil.rmtree(temp, ignore_errors=True)
    if left:
        session.config.get_terminal_writer().line(f"FAILED: the temp folder holds what the tests or the commands "
                                                  f"they ran left: {', '.join(left)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
