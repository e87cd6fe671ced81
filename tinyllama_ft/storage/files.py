"""Writing files so that a reader never sees half of one: a folder or a JSON file is written under a
temporary name beside its target and renamed into place (one `os.replace`, atomic on one file
system), readable by others (safetensors and `mkdtemp` create private files)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError


def write_json(path: Path, data) -> None:
    """`data` as indented JSON (numpy and torch scalars as floats), in place: for files inside a staging folder."""
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def replace_json(path: Path, data) -> None:
    """Replace `path` with `data` as JSON atomically: readers see the old file or the new one, never half."""
    staging = path.with_name(f".{path.name}.tmp")
    write_json(staging, data)
    os.chmod(staging, 0o644)
    os.replace(staging, path)


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
    staging = path.with_name(f".{path.name}.tmp")
    try:
        staging.write_text(text, encoding="utf-8")
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644: the outputs are meant to be shared."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def written_folder(out: Path, prefix: str):
    """Yield a new, empty temporary folder beside `out` to write into; when the block ends it becomes
    `out` (readable by others); when it fails, it is removed. So `out` is whole or absent, and nothing
    is left behind (in the system temp folder either)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{prefix}-"))  # same file system: the rename is atomic
    try:
        yield tmp
        make_readable(tmp)
        os.replace(tmp, out)
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
    is deleted. A crash between the two renames leaves both, which `finish_replacement` completes."""
    _, old = replacement_paths(out)
    make_readable(new)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def finish_replacement(out: Path, complete=None) -> None:
    """After a stop in `swap_in`: put whichever folder is whole at `out` (the new one when
    `complete(new)`, else the old one) and delete the rest. A no-op when nothing was interrupted."""
    out = Path(out)
    new, old = replacement_paths(out)
    if not old.exists():
        return
    complete = complete or (lambda folder: (folder / "metrics.json").is_file())
    if out.exists():  # the swap finished; only the deletion of the old folder did not
        shutil.rmtree(old, ignore_errors=True)
    elif new.exists() and complete(new):
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, out)
