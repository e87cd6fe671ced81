"""Writing files so that a reader never sees half of one: a folder or a JSON file is written under a
temporary name beside its target and renamed into place (one `os.replace`, atomic on one file
system, retried for a moment where Windows refuses it: `move`), readable by others (safetensors
creates private files)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError, on_failure
from .lock import folder_lock, holder, remove_abandoned, staging_path


MOVE_TRIES = 6  # about 1.5 s in all: an antivirus scan or Explorer's thumbnailer lets go of a file by then


def move(source: Path, target: Path) -> None:
    """`os.replace(source, target)`, tried again a few times with a growing pause when it raises
    PermissionError: on Windows a file that another program holds open for a moment (an antivirus, Explorer,
    a search indexer) cannot be renamed. The last PermissionError is raised."""
    for attempt in range(MOVE_TRIES):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if attempt == MOVE_TRIES - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)


def write_json(path: Path, data) -> None:
    """`data` as indented JSON (numpy and torch scalars as floats), in place: for files inside a staging folder."""
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def replace_json(path: Path, data) -> None:
    """Replace `path` with `data` as JSON atomically: readers see the old file or the new one, never half."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_json(staging, data)
        os.chmod(staging, 0o644)
        move(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def check_out_file(path: Path) -> None:
    """An output file path a command may write: not a folder; its parents are created when missing."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder: pass a file path (e.g. {path / 'preview.jsonl'})")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {path}: {parent} is a file, not a folder: choose another path")


def write_text_file(path: Path, text: str) -> None:
    """`text` into `path` atomically (a temporary file beside it, renamed), parents created, mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(text, encoding="utf-8")
        os.chmod(staging, 0o644)
        move(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644: the outputs are meant to be shared."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def written_folder(out: Path, command: str):
    """Yield a new, empty folder beside `out` (`.<name>.writing`) to write into; when the block ends it
    becomes `out` (readable by others); when it fails (an error, Ctrl-C, SIGTERM), it is removed. `out`'s
    lock (`command` holds it) is held throughout, and what a killed command left beside it is removed first.
    So `out` is whole or absent, and nothing is left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, command):
        remove_abandoned(out.parent)
        tmp = staging_path(out)  # same file system: the rename is atomic
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with on_failure(out):  # read the disk before the cleanup below frees it
                yield tmp
                make_readable(tmp)
                move(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --- replacing a finished folder by a new one, crash-safely --------------------------------------

def replacement_paths(out: Path) -> tuple[Path, Path]:
    """(the new folder, written beside `out` while `out` stays as it is; the old one, for a moment
    while the two are swapped): hidden siblings on the same file system, so each move is one rename."""
    out = Path(out)
    return out.with_name(f".{out.name}.replacing"), out.with_name(f".{out.name}.replaced")


def swap_in(new: Path, out: Path) -> None:
    """Make the complete folder `new` be `out`: `out` moves aside, `new` takes its name, the old one
    is deleted. A crash between the two renames leaves both, which `finish_replacement` completes. When a
    rename is refused even after `move`'s tries, the old run is put back and the new one stays complete
    where it is, which the next command on `out` puts in place (`finish_replacement`)."""
    _, old = replacement_paths(out)
    make_readable(new)
    try:
        move(out, old)
        try:
            move(new, out)
        except OSError:
            move(old, out)
            raise
    except OSError as error:
        previous = f"{out} is as it was" if out.exists() else f"the previous run is in {old}"
        raise UserError(f"could not move the finished run into {out} ({error.strerror}; another program may "
                        f"hold a file there): it is complete in {new}, and {previous}; close that program and run "
                        f"any command on {out} (e.g. generate) to put the new run in place") from None
    shutil.rmtree(old, ignore_errors=True)


def finish_replacement(out: Path, complete=None) -> None:
    """After a stop in `swap_in`: put whichever folder is whole at `out` (the new one when
    `complete(new)`, else the old one) and delete the rest; a complete new run whose swap never began
    (refused) is put in place too. A no-op when nothing was interrupted, and while another process
    holds `out`'s lock (it may be swapping them now)."""
    out = Path(out)
    new, old = replacement_paths(out)
    if not (old.exists() or new.exists()):
        return
    info = holder(out)
    if info is not None and info.get("pid") != os.getpid():
        return
    complete = complete or (lambda folder: (folder / "metrics.json").is_file())
    if not old.exists():
        if out.is_dir() and new.is_dir() and complete(new):  # finished, but its swap was refused
            swap_in(new, out)
        return
    if out.exists():  # the swap finished; only the deletion of the old folder did not
        shutil.rmtree(old, ignore_errors=True)
    elif new.exists() and complete(new):
        move(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        move(old, out)
