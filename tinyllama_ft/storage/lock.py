"""One command at a time in an output folder: `folder_lock(out, command)` holds `.<name>.lock` beside it, a
small JSON file (pid, host, command, start time) created atomically (written under a temporary name, then
hard-linked into place, which fails when it exists). A second command is refused in one line naming the
holder; a lock whose process is gone (same host) is taken over with a one-line note. What a killed command
left (`.<name>.writing`, a stopped export's staging folder) is removed by the next one, only when no live
process holds its lock (`remove_abandoned`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)


def lock_path(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))  # "." has no name to put beside
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def folder_lock(folder, command: str):
    """Hold `folder`'s lock while the block runs (only the main process of a multi-process run takes it)."""
    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = lock_path(folder)
    held = _read(path)
    if held is not None and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        yield  # this process holds it already (an export's folder, locked around its checks and its write)
        return
    made = missing_folders(path.parent)
    try:
        mine = _acquire(path, folder, command)
    except (NotADirectoryError, FileExistsError):  # a file where a folder of the path should be: the
        mine = None  # command's own check of its path says so in one line
    if mine is None:
        yield
        return
    try:
        yield
    finally:
        if _read(path) == mine:
            path.unlink(missing_ok=True)
        for parent in made:  # a refused command leaves no empty folder the lock alone made
            with contextlib.suppress(OSError):
                parent.rmdir()


def missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, deepest first."""
    missing = []
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def holder(folder) -> dict | None:
    """Who holds `folder`'s lock (pid, host, command, started), when a live process does; else None."""
    info = _read(lock_path(Path(folder)))
    return info if info is not None and not _stale(info) else None


def check_not_in_use(folder, what: str) -> None:
    """Refuse to read `folder` (`what`: e.g. "--adapter") while another command writes or replaces it."""
    info = holder(folder)
    if info is not None and info.get("pid") != os.getpid():
        raise UserError(f"{what} {folder} is in use by {_describe(info)}: wait for it to finish, then run this "
                        "command again")


def _acquire(path: Path, folder: Path, command: str) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command_line(command),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        if _create(path, mine):
            return mine
        info = _read(path)
        if info is None:  # removed meanwhile, or being written this instant: try again
            time.sleep(0.05)
            continue
        if not _stale(info):
            raise UserError(f"{folder} is in use by {_describe(info)}: wait for it to finish, or choose "
                            "another folder")
        if _take_over(path, info):
            log.warning("taking over the lock of %s from %s, which is no longer running", folder, _describe(info))
    raise UserError(f"could not lock {folder} ({path} keeps changing): run the command again")


def command_line(verb: str) -> str:
    """`verb` and the arguments after it on this process's command line (what a refused command shows)."""
    args = sys.argv[sys.argv.index(verb) + 1:] if verb in sys.argv else []
    return " ".join([verb, *args])[:200]


def _create(path: Path, info: dict) -> bool:
    """Write `info` to `path` only if `path` does not exist, atomically (complete or absent)."""
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(json.dumps(info) + "\n", encoding="utf-8")
    except OSError as error:  # a read-only or full disk: name the folder, not our lock file
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        raise type(error)(error.errno, error.strerror, str(path.parent)) from None
    try:
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links (FAT, some network shares): exclusive create instead
        try:
            with open(path, "x", encoding="utf-8") as file:
                file.write(json.dumps(info) + "\n")
            return True
        except FileExistsError:
            return False
    finally:
        staging.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict) -> bool:
    """Remove a dead holder's lock, and only that one: moved aside first, then compared (another process may
    have taken it over and locked again in between; then its lock goes back)."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) == stale:
        aside.unlink(missing_ok=True)
        return True
    os.replace(aside, path)
    return False


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _stale(info: dict) -> bool:
    """The holder ran on this host and is gone (a lock from another host is never taken over)."""
    return info.get("host") == socket.gethostname() and not process_alive(int(info.get("pid", 0)))


def _describe(info: dict) -> str:
    return f"`{info.get('command', '?')}` (pid {info.get('pid', '?')}, since {info.get('started', '?')})"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill would terminate it there
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# --- what killed commands leave ----------------------------------------------------------------------

def staging_path(folder: Path) -> Path:
    """Where a folder is written before it is renamed into place: a hidden sibling, one per target."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.writing")


def remove_abandoned(parent: Path) -> None:
    """Remove staging folders (`.X.writing`) and lock files of commands that were killed, in `parent`: only
    those whose lock no live process holds."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for entry in parent.glob(".*.lock"):
        info = _read(entry)
        if info is not None and _stale(info) and _take_over(entry, info):
            log.info("removing %s, the lock of %s, which is no longer running", entry, _describe(info))
    for entry in parent.glob(".*.writing"):
        target = entry.with_name(entry.name[1:-len(".writing")])
        if holder(target) is None:
            log.info("removing %s, left by a command that was stopped", entry)
            shutil.rmtree(entry, ignore_errors=True)
    for entry in parent.glob(".*.lock.*.tmp"):
        if not process_alive(_pid_of(entry.name)):
            entry.unlink(missing_ok=True)


def remove_dead_temp_files(folder: Path) -> None:
    """Remove `.NAME.PID.tmp` files in `folder` whose writer (PID, this host) is gone: what a killed write left."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.glob(".*.tmp"):
        pid = _pid_of(entry.name)
        if pid and not process_alive(pid):
            log.info("removing %s, left by a process that was stopped", entry)
            entry.unlink(missing_ok=True)


def _pid_of(name: str) -> int:
    match = re.search(r"\.(\d+)\.tmp$", name)
    return int(match.group(1)) if match else 0
