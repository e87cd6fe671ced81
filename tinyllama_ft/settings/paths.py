"""How the files a run writes name its paths, without the machine's folders in them (a user's name on Windows, a
card that goes to the hub), and how a run's data is identified by its content rather than its spelling.

`recorded(settings)`: the settings as run_config.json records them. A relative path is kept as given; an absolute
`output_dir` or `resume_from_checkpoint` becomes its last name (nothing reads it back). An absolute `dataset_name`
or `adapter` (a DPO run's SFT run) stays in the run folder where the user passed it, as DPO reads the SFT run's
data again from it and a DPO run names its SFT run; in everything meant to be shared (`public=True`: the model
card, a merged export's run_config.json) the data becomes its file name and content hash (`name (sha256
0123...)`), as the package's own sample does everywhere, and the adapter its last name. A bundled sample recorded
that way is found again by `find_recorded_data`.

`data_identity(name)`: what the resume fingerprint compares: a content hash for local data, so that `./x.jsonl`,
`x.jsonl` and (on Windows) `data\\x.jsonl` are the same data, and other data is not.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

PATH_FIELDS = ("output_dir", "resume_from_checkpoint", "logging_dir")  # never read back from a record
SAMPLES = Path(__file__).parents[1] / "samples"  # the package's bundled data
_RECORD = re.compile(r"(?P<name>.+) \(sha256 (?P<hash>[0-9a-f]{16})\)")


def content_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (their relative names and bytes, in order); 16 hex digits."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def data_identity(name: str | None) -> str | None:
    """A hub id as it is; local data (a file or a folder) as `sha256:` and its content hash, whatever its spelling."""
    if name is None or not Path(name).exists():
        return name
    return f"sha256:{content_hash(name)}"


def recorded_path(path: str) -> str:
    """A folder we only name, not read back: a relative path as given, an absolute one as its last name."""
    return Path(path).name if Path(path).is_absolute() else path


def recorded_data(name: str | None, public: bool = False) -> str | None:
    """`dataset_name` as a record names it (the module docstring)."""
    if name is None or _RECORD.fullmatch(name) or not Path(name).is_absolute():
        return name  # a hub id, a relative path as given, or already recorded
    if not public and not is_bundled(name):
        return name  # the user's own absolute path: the run folder must find the data again
    return f"{Path(name).name} (sha256 {content_hash(name)})" if Path(name).exists() else Path(name).name


def is_bundled(name: str) -> bool:
    return Path(name).resolve().parent == SAMPLES.resolve()


def find_recorded_data(name: str | None) -> str | None:
    """A bundled sample recorded as `name (sha256 ...)` as its path here, where its content still matches; any
    other name as it is."""
    match = _RECORD.fullmatch(name or "")
    if match is None:
        return name
    candidate = SAMPLES / match["name"]
    return str(candidate) if candidate.is_file() and content_hash(candidate) == match["hash"] else name


def recorded(settings: dict, public: bool = False) -> dict:
    """`settings` (a configuration's `to_json()` as a dict) as a file we write records it (the module docstring);
    a DPO run's `sft_run_config` likewise."""
    out = dict(settings)
    for field in PATH_FIELDS + (("adapter",) if public else ()):
        if isinstance(out.get(field), str):
            out[field] = recorded_path(out[field])
    if isinstance(out.get("dataset_name"), str):
        out["dataset_name"] = recorded_data(out["dataset_name"], public)
    if isinstance(out.get("sft_run_config"), dict):
        out["sft_run_config"] = recorded(out["sft_run_config"], public)
    return out
