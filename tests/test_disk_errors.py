"""A failed write (a full disk, a read-only folder, a file-size limit, a name too long) ends a command in one
line: the errno's meaning, the path, the fix, and what is still intact; never a traceback, and nothing of ours
left beside the output. Each error has its real cause: a small tmpfs (ENOSPC) and a read-only bind mount
(EROFS) when the tests run as root, a read-only folder (chmod) otherwise, RLIMIT_FSIZE (`ulimit -f`, EFBIG) and
a name longer than the file system allows (ENAMETOOLONG)."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SMOKE_RUN
from tinyllama_ft.errors import os_error_line

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the errors' causes are made the POSIX way (mount, "
                                "ulimit -f, 255-byte names)")
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def cli(*args, limit_bytes=None) -> subprocess.CompletedProcess:
    """The real command line; `limit_bytes`: the file-size limit of the process (`ulimit -f`)."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit if limit_bytes else None)


def mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """`path` on a tmpfs of `size` (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (ROOT_USER and mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))):
        pytest.skip("a full disk needs a small tmpfs, which only root can mount here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def read_only(path: Path):
    """`path` read-only: a read-only bind mount as root (chmod does not stop root), chmod 0555 otherwise."""
    if ROOT_USER:
        if not (mount("--bind", str(path), str(path)) and mount("-o", "remount,bind,ro", str(path))):
            subprocess.run(["umount", "-l", str(path)])
            pytest.skip("a read-only folder needs a bind mount, which failed here (no CAP_SYS_ADMIN)")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)
    else:
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)


def fill(disk: Path, leave: int) -> None:
    """Fill the file system of `disk` up to `leave` free bytes."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / "filler", "wb") as file:
        file.write(b"\0" * max(free, 0))


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line(result, errno_name: str, path: Path, intact: str) -> str:
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("error: ") and f"({errno_name})" in last, last
    assert str(path) in last and last.endswith(intact), last
    return last


# --- train --overwrite_output_dir true over a finished run: the previous run stays as it was ----------------

def replace_run(out: Path, **kwargs):
    return cli("train", *SMOKE_RUN, "--output_dir", out, "--overwrite_output_dir", "true", "--seed", "7", **kwargs)


def assert_previous_run_intact(result, errno_name, out, before):
    assert_one_line(result, errno_name, out, f"{out} still holds the previous run, unchanged")
    assert files(out) == before
    assert listing(out.parent) in (["run"], ["filler", "run"]), "no staging, replacement or lock left beside it"


@pytest.mark.slow
def test_replacing_a_run_on_a_full_disk(finished_run, tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        out = disk / "run"
        shutil.copytree(finished_run, out)
        fill(disk, leave=160_000)  # room for a checkpoint's first files, not for the whole run beside the old one
        before = files(out)
        assert_previous_run_intact(replace_run(out), "ENOSPC", out, before)


@pytest.mark.slow
def test_replacing_a_run_in_a_read_only_folder(finished_run, tmp_path):
    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro" / "run"
    shutil.copytree(finished_run, out)
    before = files(out)
    with read_only(tmp_path / "ro"):
        result = replace_run(out)
    assert_previous_run_intact(result, "EROFS" if ROOT_USER else "EACCES", out, before)


@pytest.mark.slow
def test_replacing_a_run_past_the_file_size_limit(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = files(out)
    # 56 KB: the adapter (58 KB) is the first file over it, in the first checkpoint
    assert_previous_run_intact(replace_run(out, limit_bytes=56_000), "EFBIG", out, before)


@pytest.mark.slow
def test_replacing_a_run_whose_name_leaves_no_room_for_its_replacement(finished_run, tmp_path):
    out = tmp_path / ("r" * 245)  # the replacement, `.<name>.replacing`, is 11 characters longer: over 255
    shutil.copytree(finished_run, out)
    before = files(out)
    result = replace_run(out)
    assert_one_line(result, "ENAMETOOLONG", out, f"{out} still holds the previous run, unchanged")
    assert files(out) == before and listing(tmp_path) == [out.name]


# --- export and export --format gguf: --out is whole or absent ---------------------------------------------

FORMATS = {"safetensors": [], "gguf": ["--format", "gguf"]}


def export(run: Path, out: Path, fmt: str, **kwargs):
    return cli("export", "--adapter", run, "--out", out, *FORMATS[fmt], **kwargs)


def assert_not_created(result, errno_name, out):
    assert_one_line(result, errno_name, out, f"{out} was not created")
    assert not out.exists()
    assert [n for n in listing(out.parent) if n != "filler"] == [], "no staging folder, partial file or lock left"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_to_a_full_disk(fmt, finished_run, tmp_path):
    with small_disk(tmp_path / "disk", "320k") as disk:  # the merged model is 810 KB, the f16 GGUF 437 KB
        assert_not_created(export(finished_run, disk / "out", fmt), "ENOSPC", disk / "out")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_into_a_read_only_folder(fmt, finished_run, tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        result = export(finished_run, tmp_path / "ro" / "out", fmt)
    assert_not_created(result, "EROFS" if ROOT_USER else "EACCES", tmp_path / "ro" / "out")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_past_the_file_size_limit(fmt, finished_run, tmp_path):
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "out"
    assert_not_created(export(finished_run, out, fmt, limit_bytes=200_000), "EFBIG", out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_to_a_name_too_long(fmt, tmp_path):
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / ("x" * 300)
    # the name is refused before the model loads: any folder that exists serves as --adapter
    result = export(tmp_path, out, fmt)
    assert_one_line(result, "ENAMETOOLONG", out, f"{out} was not created")
    assert listing(tmp_path / "exports") == []


def test_debug_still_raises_the_error(tmp_path):
    result = cli("export", "--adapter", tmp_path, "--out", tmp_path / ("x" * 300), "--debug")
    assert "Traceback" in result.stderr and "File name too long" in result.stderr


# --- the line itself, for the errors that reach it wrapped ------------------------------------------------

def test_a_safetensors_error_wrapping_an_io_error_is_read_as_its_errno(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tinyllama_ft.errors import on_failure

    with pytest.raises(Exception) as caught, on_failure(tmp_path / "out", "nothing was changed"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / "missing" / "w.safetensors"))
    assert type(caught.value).__name__ == "SafetensorError"
    assert os_error_line(caught.value) == (f"{tmp_path / 'out'}: No such file or directory (ENOENT): a folder on the "
                                           "path does not exist (or vanished meanwhile): check the path; nothing was "
                                           "changed")


def test_an_error_that_is_not_the_file_systems_is_not_taken_for_one():
    from tinyllama_ft.errors import as_os_error

    assert as_os_error(ValueError("os error 28")) is None and as_os_error(RuntimeError("CUDA out of memory")) is None
