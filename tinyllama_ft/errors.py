"""The one exception type the command line turns into a one-line message, the argument parser whose mistakes
become that exception, and the one line a failed file-system call (a full disk, a read-only folder) becomes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shutil
from pathlib import Path


class UserError(ValueError):
    """Bad input or configuration: the message names the problem and the fix."""


class ArgParser(argparse.ArgumentParser):
    """argparse, with a bad argument raised as one `UserError` line (argparse alone prints its usage and exits)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}{self.did_you_mean(message)}")

    def did_you_mean(self, message: str) -> str:
        """" (did you mean --name?)" for the first unrecognized flag, case aside; "" when none is close."""
        import difflib

        flags = [w.split("=")[0] for w in message.split() if w.startswith("--")] if "unrecognized" in message else []
        options = [o for o in self._option_string_actions if o.startswith("--")]
        match = difflib.get_close_matches(flags[0].lower(), options, 1) if flags else []
        return f" (did you mean {match[0]}?)" if match else ""


# --- a failed write or read of the file system, as one line -----------------------------------------

ERRNO_HINTS = {  # the fix, by errno name
    "ENOSPC": "free some space, or choose a folder on another disk",
    "EDQUOT": "free some space (your quota is used up), or choose a folder on another disk",
    "EROFS": "choose a folder on a disk you can write to",
    "EACCES": "choose a folder you can write to, or fix its permissions",
    "EPERM": "choose a folder you can write to, or fix its permissions",
    "EFBIG": "a file outgrew the file system or your file-size limit (`ulimit -f`; FAT32 holds 4 GB a file): "
             "raise the limit or choose a folder on another disk",
    "ENAMETOOLONG": "choose a shorter path",
    "ENOENT": "a folder on the path does not exist (or vanished meanwhile): check the path",
    "EIO": "check the disk (full? a file-size limit?) and its free space",
}
_CONTEXT = "_tinyllama_ft_context"  # (path, what is still intact, errno), set on an error by `on_failure`


@contextlib.contextmanager
def on_failure(path, intact: str | None = None):
    """Around a write into `path`: an error escaping the block carries `path`, what is still intact when known
    (e.g. "the previous run is unchanged") and, for a write that failed without saying why (torch.save, a short
    numpy write), the likely errno, read from the disk now, before anything written is cleaned up. The
    innermost block's path wins; an outer block adds what is intact. `os_error_line` reads them."""
    try:
        yield
    except Exception as error:
        os_error = as_os_error(error)
        if os_error is not None:
            inner = getattr(error, _CONTEXT, None)
            likely = _likely_errno(path) if os_error.errno is None and not inner else None
            context = (inner[0], inner[1] or intact, inner[2]) if inner else (str(path), intact, likely)
            with contextlib.suppress(AttributeError, TypeError):
                setattr(error, _CONTEXT, context)
        raise


def as_os_error(error: BaseException) -> OSError | None:
    """`error` as an OSError when it is a failed file-system call: an OSError itself, a safetensors error
    wrapping one ("... (os error 28)"), or torch.save's failed write (errno unknown: None); else None."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        match = re.search(r"\(os error (\d+)\)", text)
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
    if isinstance(error, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text):
        return OSError(None, "a write failed")
    return None


def _likely_errno(path) -> int:
    """Why a write under `path` failed, when the call did not say: a (nearly) full disk, else a file-size limit."""
    with contextlib.suppress(OSError):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if shutil.disk_usage(folder).free < 64 * 2**20:
            return errno.ENOSPC
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG
    return errno.EIO


def os_error_line(error: BaseException) -> str:
    """One line for a failed file-system call: where, the errno's meaning and the fix, and what is still intact
    when that is known."""
    os_error = as_os_error(error) or OSError(str(error))
    path, intact, likely = getattr(error, _CONTEXT, None) or (None, None, None)
    code = os_error.errno or likely or 0
    where = os_error.filename or path
    meaning = os.strerror(code) if code and not os_error.errno else os_error.strerror or str(error)
    meaning = (meaning.strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    name = errno.errorcode.get(code, "")
    hint = ERRNO_HINTS.get(name, "")
    line = f"{where}: {meaning}" if where else meaning
    line += f" ({name})" if name else ""
    line += f": {hint}" if hint else ""
    return line + (f"; {intact}" if intact else "")
