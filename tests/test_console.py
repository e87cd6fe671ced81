"""What the user's console shows: any command on a cp1252 console (Windows' default) without a crash, the
known library noise silenced, a hub that cannot be reached said in one line at once.

A Windows console is stood in for on Linux by the `en_US.CP1252` locale (`localedef -f CP1252 -i en_US
en_US.CP1252`, as `.ci/run` builds it) with `PYTHONIOENCODING=cp1252`: Python then writes standard output and
error in cp1252, as on Windows, and decodes its arguments and paths with it."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_docs import SEQUENCE

CP1252 = {"LC_ALL": "en_US.CP1252", "LANG": "en_US.CP1252", "PYTHONIOENCODING": "cp1252", "COLUMNS": "100"}
UTF8 = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "COLUMNS": "100"}
COMMANDS = ["config", "preview", "train", "dpo", "generate", "chat", "serve", "export", "evaluate", "bench"]
MAX_LINES = 30  # what a smoke run may print on standard error, progress bars apart
NOISE = ("FutureWarning", "Unable to fetch remote file", "Could not find a config file", "mtime may not be reliable",
         "Retrying in", "Token indices sequence length")


@functools.lru_cache(maxsize=1)
def has_cp1252_locale() -> bool:
    locales = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.lower().split()
    return "en_us.cp1252" in locales


def require_cp1252() -> None:
    """Skip without the locale (a user's machine); fail in CI (`REQUIRE_CP1252=1`), where `.ci/run` builds it."""
    if not has_cp1252_locale():
        why = "no en_US.CP1252 locale: sudo localedef -f CP1252 -i en_US en_US.CP1252"
        pytest.fail(why) if os.environ.get("REQUIRE_CP1252") else pytest.skip(why)


def run(*args, env=None, cwd=ROOT, stdin=None) -> subprocess.CompletedProcess:
    """The command line in a process of its own (`env`: variables to set, None to unset); output decoded as
    the console's encoding is."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    encoding = env.get("PYTHONIOENCODING", "utf-8")
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=cwd, env=env,
                            input=(stdin or "").encode(encoding), capture_output=True, timeout=600)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(encoding),
                                       result.stderr.decode(encoding))


def as_the_console_shows(text: str) -> str:
    """What a cp1252 console shows of `text`: each character it cannot show replaced by "?"."""
    return text.encode("cp1252", "replace").decode("cp1252")


def utf8_exit_code(argv: list[str]) -> int:
    from tinyllama_ft.cli import main

    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0


# --- any text on any console ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], *[[command, "--help"] for command in COMMANDS]], ids=" ".join)
def test_every_help_works_on_a_cp1252_console(argv, capsys, monkeypatch):
    """TRL's help for `dpo` holds Greek letters (β): shown as "?", the exit code as under UTF-8."""
    require_cp1252()
    monkeypatch.setenv("COLUMNS", CP1252["COLUMNS"])  # argparse wraps the help to the terminal's width
    expected = utf8_exit_code(argv)
    shown = capsys.readouterr().out
    result = run(*argv, env=CP1252)
    assert "Traceback" not in result.stderr and "codec" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == expected, result.stderr[-2000:]
    assert result.stdout.replace("\r\n", "\n") == as_the_console_shows(shown)


@pytest.mark.slow
def test_the_readme_commands_work_on_a_cp1252_console(tmp_path):
    """The README's offline sequence, chat, export and evaluate, run in a fresh folder on a cp1252 console:
    what the console can show is shown, the rest is "?"; paths it cannot show are printed, not a crash."""
    require_cp1252()
    for argv in SEQUENCE[:2]:
        result = run(*argv, env=CP1252, cwd=tmp_path)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    question = ("generate", "--adapter", "runs/smoke", "--instruction", "Give me three uses of a brick.",
                "--max_new_tokens", 48)
    utf8, cp1252 = run(*question, env=UTF8, cwd=tmp_path), run(*question, env=CP1252, cwd=tmp_path)
    assert cp1252.returncode == utf8.returncode == 0, cp1252.stderr[-3000:]
    assert as_the_console_shows(utf8.stdout) != utf8.stdout  # the smoke model writes what cp1252 lacks
    assert cp1252.stdout == as_the_console_shows(utf8.stdout)
    chat = run("chat", "--adapter", "runs/smoke", "--max_new_tokens", 48, env=CP1252, cwd=tmp_path,
               stdin="Give me three uses of a brick.\n")
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr[-3000:]
    assert chat.stdout.strip() == cp1252.stdout.strip()  # chat's first answer is generate's
    # An ASCII folder: on Linux's cp1252 locale a non-ASCII argument reaches Python as cp1252 mojibake, which the
    # tokenizers library (Rust) writes under its UTF-8 spelling, another folder. Windows passes paths as Unicode;
    # a printed path the console cannot show is `evaluate`'s below.
    merged = tmp_path / "runs" / "smoke-merged"
    exported = run("export", "--adapter", "runs/smoke", "--out", merged, env=CP1252, cwd=tmp_path)
    assert exported.returncode == 0 and "Traceback" not in exported.stderr, exported.stderr[-3000:]
    assert (merged / "model.safetensors").is_file() and len(exported.stdout.strip().splitlines()) == 1
    pytest.importorskip("lm_eval")
    # Cyrillic's UTF-8 holds bytes cp1252 lacks (с: D1 81), read as escapes no encoding can print: "?"
    evaluated = run("evaluate", "--adapter", "runs/smoke", "--tasks", "dolly_mc", "--limit", 4, "--batch_size", 4,
                    "--out", tmp_path / "сводка.json", env=CP1252, cwd=tmp_path)
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.stderr, evaluated.stderr[-3000:]
    assert "dolly_mc" in evaluated.stdout and (tmp_path / "сводка.json").is_file()
    assert evaluated.stdout.strip().splitlines()[-3].endswith(".json") and "?" in evaluated.stdout


def test_streams_keep_what_the_console_shows_and_replace_the_rest():
    from tinyllama_ft.settings.console import make_streams_safe

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    with pytest.raises(UnicodeEncodeError):
        stream.write("é α")
        stream.flush()
    raw.seek(0), raw.truncate()
    make_streams_safe([stream])
    stream.write("é α\n")
    stream.flush()
    assert raw.getvalue() == "é ?\n".encode("cp1252")


# --- quiet by default --------------------------------------------------------------------------------------

def stderr_lines(text: str) -> list[str]:
    """Standard error's lines but progress bars (tqdm's redraws: `\\r`, `NN%|`, `it/s]`)."""
    bar = re.compile(r"\d+%\||\d+it \[|it/s\]|s/it\]|\x1b\[A")
    return [line for line in re.split(r"[\r\n]", text) if line.strip() and not bar.search(line)]


@pytest.mark.slow
def test_smoke_runs_say_what_matters_and_no_known_noise(tmp_path):
    """Without the hub switched off (so PEFT's look-ups are tried, at a closed port): the settings that differ,
    progress, metrics, where the run went; no configuration dump, no known library warning."""
    env = {"HF_ENDPOINT": closed_port_url(), "HF_HUB_OFFLINE": None}
    for argv in SEQUENCE[:2]:
        result = run(*argv, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = stderr_lines(result.stderr)
        assert len(lines) <= MAX_LINES, "\n".join(lines)
        assert not [line for line in lines if any(noise in line for noise in NOISE)], "\n".join(lines)
        assert "Setting accelerator to CPU" not in result.stdout  # DeepSpeed's, when installed
        assert any("settings other than the defaults" in line and "run_config.json" in line for line in lines)
        assert any("metrics:" in line for line in lines) and "the run is in runs/smoke" in lines[-1]
    verbose = run("train", "--preset", "smoke", "--output_dir", "verbose", "--verbose", env=env, cwd=tmp_path)
    assert verbose.returncode == 0 and "is_gradient_checkpointing" in verbose.stderr  # --verbose keeps it all
    assert '"lora_dropout": 0.05' in verbose.stderr  # the full configuration


def test_each_silenced_warning_says_why():
    from tinyllama_ft.settings.console import NOISY_LOGGERS, NOISY_RECORDS, NOISY_WARNINGS

    for entry in [*NOISY_WARNINGS, *NOISY_LOGGERS, *NOISY_RECORDS]:
        assert len(entry[-1].split()) >= 5, entry


def test_over_long_rows_are_counted_without_the_tokenizers_warning(tinyllama_tokenizer, caplog):
    """Rows beyond the model's 2048 positions are dropped and counted by `encode_rows`; the tokenizer's own
    "longer than the specified maximum" warning would only repeat it (and wrongly: nothing is indexed)."""
    from tinyllama_ft.data.encoding import encode_rows

    long = {"instruction": "Repeat. " * 1500, "context": "", "response": "Done."}
    tinyllama_tokenizer.deprecation_warnings.clear()
    with caplog.at_level("WARNING"):
        encoded, excluded, _ = encode_rows(tinyllama_tokenizer, [long], max_length=1024)
    assert not encoded and "> max_length 1024" in excluded[0]
    assert "Token indices sequence length" not in caplog.text


# --- the hub, unreachable -----------------------------------------------------------------------------------

def closed_port_url() -> str:
    """http://127.0.0.1:PORT where nothing listens (a port just bound and released): connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("args, names", [
    (["train", "--output_dir", "r"], "the model 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'"),  # the README's real run
    (["train", "--preset", "smoke", "--dataset_name", "nobody/no-such-rows", "--output_dir", "r"],
     "the dataset 'nobody/no-such-rows'"),
])
def test_a_hub_that_cannot_be_reached_is_one_line_at_once(args, names, tmp_path):
    """No retries (huggingface_hub's take ~30 s and log each try twice): one request, one line naming the fix.
    The whole command took 6-7 s on the quiet 2-core VM (importing the ML stack); the bound here leaves room for
    a loaded machine and still fails on the libraries' half-minute."""
    start = time.perf_counter()
    result = run(*args, env={"HF_ENDPOINT": closed_port_url(), "HF_HUB_OFFLINE": None}, cwd=tmp_path)
    assert time.perf_counter() - start < 20
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: cannot reach the hub at http://127.0.0.1:") and names in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and not (tmp_path / "r").exists()


@contextlib.contextmanager
def silent_server_url():
    """http://127.0.0.1:PORT of a socket that listens and never answers: the connection opens (the kernel's
    backlog), the request goes out and no byte comes back, as on a network that drops what it is sent."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_hub_that_does_not_answer_costs_one_timeout(monkeypatch):
    """The slowest way to be offline: nothing answers. The check gives up after `TIMEOUT_S` in all, then one
    line: not the libraries' retries (30 s), nor huggingface_hub 2.x's own first request (a registry, 3 s more)
    before ours. (The whole command: importing torch, transformers, PEFT and TRL first, ~6 s on 2 cores.)"""
    from huggingface_hub import constants

    from tinyllama_ft.errors import UserError
    from tinyllama_ft.settings.hub import TIMEOUT_S, check_on_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with silent_server_url() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        start = time.perf_counter()
        with pytest.raises(UserError, match=f"^cannot reach the hub at {url} \\(no answer in 5 s\\) for the model "
                                            "'nobody/silent'"):
            check_on_hub("nobody/silent")
        waited = time.perf_counter() - start
    assert TIMEOUT_S <= waited < TIMEOUT_S + 2, waited


def test_a_missing_data_file_is_said_before_the_model_is_looked_for(tmp_path):
    result = run("train", "--dataset_name", "missing.jsonl", "--output_dir", "r",
                 env={"HF_ENDPOINT": closed_port_url(), "HF_HUB_OFFLINE": None}, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: dataset file missing.jsonl does not exist: check --dataset_name"]


@pytest.mark.slow
def test_the_notebook_refuses_in_one_line_in_its_own_words(tmp_path):
    """The real run's notebook without the hub: the configuration cell's output is one line naming the
    parameter (not the command line's flag). (The cell fails, so a headless run without --allow-errors stops.)"""
    from test_notebook import NOTEBOOK, code_cells, notebook_env

    env = notebook_env(tmp_path / "run") | {"HF_ENDPOINT": closed_port_url()}
    env.pop("HF_HUB_OFFLINE", None)
    jupyter = Path(sys.executable).parent / "jupyter"
    result = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", str(NOTEBOOK), "--output-dir",
                             str(tmp_path), "--output", "refused", "--allow-errors",
                             "--ExecutePreprocessor.kernel_name=python3"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cells = code_cells(json.loads((tmp_path / "refused.ipynb").read_text(encoding="utf-8")))
    failed = next(cell for cell in cells if "run.check()" in "".join(cell["source"]))
    assert [o["output_type"] for o in failed["outputs"]] == ["stream"], failed["outputs"]
    text = "".join(failed["outputs"][0]["text"]).strip().splitlines()
    assert len(text) == 1 and text[0].startswith("error: cannot reach the hub at http://127.0.0.1:"), text
    assert "pass model_name_or_path a local folder" in text[0] and "--model_name_or_path" not in text[0]
