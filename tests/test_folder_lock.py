"""An output folder's life among other commands: one command at a time writes it (a second one is refused in
one line naming the holder), a dead holder's lock is taken over, nothing is left behind however a command
stops (beside --out, inside it, in the temp folder), and a rename that Windows refuses for a moment is tried
again, or, refused for good, keeps the finished run where the next command finds it.

Two real commands meet deterministically: the first is held at a known point (`pause_probe.py`), or the lock
is held by this test process itself, while the second runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SMOKE_RUN
from tinyllama_ft import parse_config
from tinyllama_ft.errors import UserError
from tinyllama_ft.storage import files
from tinyllama_ft.storage.files import replacement_paths, swap_in
from tinyllama_ft.storage.lock import folder_lock, lock_path
from tinyllama_ft.storage.run_folder import check_output_dir, training_folder

THIRD_PARTY_TEMP = ("torchinductor_",)  # torch's compile cache: not ours


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def temp_env(tmp_path) -> tuple[dict, Path]:
    """An environment whose temp folder is a fresh one, to list afterwards."""
    temp = tmp_path / "temp"
    temp.mkdir()
    return {**os.environ, "TMPDIR": str(temp), "TEMP": str(temp), "TMP": str(temp)}, temp


def ours(temp: Path) -> list[str]:
    return sorted(p.name for p in temp.iterdir() if not p.name.startswith(THIRD_PARTY_TEMP))


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def paused(stage, marker: Path, *argv, env=None) -> subprocess.Popen:
    """A real command held at `stage` (see pause_probe.py) until it is signalled."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "pause_probe.py"), stage, str(marker), *argv],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not marker.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(f"did not reach {stage}: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen, signum) -> str:
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)  # reaped: its pid is gone
    return err


def refusal(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


# --- one command at a time --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "dpo", "export"])
def test_a_second_command_into_a_folder_in_use_is_refused_in_one_line(command, finished_run, tmp_path):
    out = tmp_path / "out"
    argv = {"train": ["train", *SMOKE_RUN, "--output_dir", out],
            "dpo": ["dpo", "--preset", "smoke", "--adapter", finished_run, "--output_dir", out],
            "export": ["export", "--adapter", finished_run, "--out", out]}[command]
    with folder_lock(out, "train"):  # this test process holds it, as a running command would
        line = refusal(cli(*argv))
    assert line.startswith(f"error: {out} is in use by `train") and f"(pid {os.getpid()}, since " in line, line
    assert listing(tmp_path) == [], "the refused command wrote nothing, and the lock went with its holder"


@pytest.mark.slow
def test_two_real_commands_on_one_run_folder(finished_run, tmp_path):
    """A run replacing the finished one is held mid-training: a second train into the folder, a DPO stage and an
    export reading it are refused, naming it; stopped (SIGINT), it leaves the old run and nothing beside it."""
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    first = paused("step-1", tmp_path / "marker", "train", *SMOKE_RUN, "--output_dir", out,
                   "--overwrite_output_dir", "true")
    try:
        holder = (f"is in use by `train {' '.join(SMOKE_RUN)} --output_dir {out} --overwrite_output_dir true` "
                  f"(pid {first.pid}")
        assert f"error: {out} {holder}" in refusal(cli("train", *SMOKE_RUN, "--output_dir", out))
        dpo = cli("dpo", "--preset", "smoke", "--adapter", out, "--output_dir", tmp_path / "dpo")
        assert f"error: --adapter {out} {holder}" in refusal(dpo)
        export = cli("export", "--adapter", out, "--out", tmp_path / "merged")
        assert f"error: --adapter {out} {holder}" in refusal(export)
        assert sorted(listing(tmp_path)) == [".run.lock", ".run.replacing", "marker", "run"]
    finally:
        err = stop(first, signal.SIGINT)
    assert first.returncode == 130 and "still holds the run it was replacing, unchanged" in err
    assert listing(tmp_path) == ["marker", "run"], "the replacement and the lock went with the stopped command"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_dead_commands_lock_is_taken_over_with_a_note(tmp_path, caplog):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "command": "train x",
                                          "started": "2026-01-01 00:00:00"}), encoding="utf-8")
    with caplog.at_level("WARNING"), folder_lock(out, "export"):
        assert json.loads(lock_path(out).read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and "`train x`" in caplog.text and "no longer running" in caplog.text
    assert listing(tmp_path) == []


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "command": "train y",
                                          "started": "2026-01-01 00:00:00"}), encoding="utf-8")
    with pytest.raises(UserError, match=r"is in use by `train y`"), folder_lock(out, "export"):
        pass
    assert lock_path(out).exists()


# --- nothing left behind ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGKILL", None)],
                         ids=["sigint", "sigterm", "sigkill"])
def test_a_gguf_export_stopped_mid_write_leaves_nothing(signum, finished_run, tmp_path):
    env, temp = temp_env(tmp_path)
    exports = tmp_path / "exports"
    exports.mkdir()
    process = paused("gguf-written", tmp_path / "marker", "export", "--adapter", finished_run, "--out",
                     exports / "out", "--format", "gguf", env=env)
    assert listing(exports) == [".out.lock", ".out.writing"] and list((exports / ".out.writing").glob("*.gguf"))
    stop(process, signum)
    if signum == signal.SIGKILL:  # nothing of ours ran after it: the next export (to another --out) clears it
        assert listing(exports) == [".out.lock", ".out.writing"]
        result = cli("export", "--adapter", finished_run, "--out", exports / "other", "--format", "gguf", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert listing(exports) == ["other"]
    else:
        assert listing(exports) == []
    assert ours(temp) == []


@pytest.mark.slow
def test_a_killed_tokenization_leaves_no_temporary_file_and_commands_no_temp_folder(tmp_path):
    env, temp = temp_env(tmp_path)
    cache = tmp_path / "datasets"
    env["HF_DATASETS_CACHE"] = str(cache)
    (cache / "tinyllama_ft").mkdir(parents=True)
    left = cache / "tinyllama_ft" / f".encoded-0123.npz.{dead_pid()}.tmp"  # what a tokenization killed mid-write leaves
    left.write_bytes(b"PK\x03\x04 half a file")
    result = cli("train", *SMOKE_RUN, "--output_dir", tmp_path / "run", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left.exists() and not list(cache.rglob("*.tmp"))
    assert ours(temp) == [], "the tiny random model is built in memory: no tiny-random-llama-* folder"
    assert listing(tmp_path) == ["datasets", "run", "temp"]


# --- Windows: a rename refused for a moment, or for good ----------------------------------------------------

def finished(folder: Path, tag: str) -> Path:
    folder.mkdir()
    (folder / "metrics.json").write_text(tag, encoding="utf-8")
    (folder / "adapter_model.safetensors").write_text(tag, encoding="utf-8")
    return folder


def refusing(times: int, only=lambda source: True):
    """os.replace that raises PermissionError (as Windows does while an antivirus holds a file) `times` times."""
    replace, calls = os.replace, []

    def flaky(source, target):
        calls.append(source)
        if only(Path(source)) and len([c for c in calls if only(Path(c))]) <= times:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process",
                                  str(source))
        return replace(source, target)

    return flaky, calls


def test_a_swap_refused_for_a_moment_is_tried_again(tmp_path, monkeypatch):
    out = finished(tmp_path / "run", "old")
    new, _ = replacement_paths(out)
    finished(new, "new")
    flaky, calls = refusing(2)
    monkeypatch.setattr(files.os, "replace", flaky)
    swap_in(new, out)
    assert (out / "metrics.json").read_text(encoding="utf-8") == "new" and listing(tmp_path) == ["run"]
    assert len(calls) == 4  # two refusals, then both renames


def test_a_swap_refused_for_good_keeps_the_finished_run_for_the_next_command(tmp_path, monkeypatch):
    out = finished(tmp_path / "run", "old")
    new, _ = replacement_paths(out)
    finished(new, "new")
    flaky, _ = refusing(100, only=lambda source: source.name == ".run.replacing")
    monkeypatch.setattr(files.os, "replace", flaky)
    monkeypatch.setattr(files, "MOVE_TRIES", 3)
    with pytest.raises(UserError) as refused:
        swap_in(new, out)
    assert str(refused.value).startswith(f"could not move the finished run into {out} (The process cannot access")
    assert f"it is complete in {new}, and {out} is as it was" in str(refused.value)
    assert (out / "metrics.json").read_text(encoding="utf-8") == "old" and listing(tmp_path) == [".run.replacing", "run"]
    monkeypatch.undo()  # the program let go: the next command puts the finished run in place, deletes nothing
    config = parse_config(SMOKE_RUN + ["--output_dir", str(out), "--overwrite_output_dir", "true"])
    check_output_dir(config)
    assert (out / "metrics.json").read_text(encoding="utf-8") == "new" and listing(tmp_path) == ["run"]
    assert training_folder(config) == new and not new.exists()
