"""Where a run's time and memory go: wall-clock seconds per stage, and on CUDA each stage's peak memory, for
`train` and the notebook alike.

    timings = Timings()
    with timings("prepare_data"):
        data = prepare_data(config, tokenizer)
    timings.as_dict()    # {"prepare_data": 1.2, ..., "total": 1.3}: total = wall time since Timings()
    timings.peaks        # on CUDA {"prepare_data": 1234567890, ...}: bytes PyTorch reserved, the stage's own peak

A CPU run records no peak per stage: the resident set's high-water mark can be started afresh only on Linux, by
writing to `/proc/self/clear_refs`, and that also changes what `getrusage` and `time -v` report for the whole
process. `benchmarks/memory_stages.py` does it, on purpose (`reset_peak_memory(cpu=True)`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from .files import replace_json

log = logging.getLogger(__name__)


def reset_peak_memory(cpu: bool = False) -> bool:
    """Start a new high-water mark: CUDA's, or with `cpu` on Linux the resident set's (see the module docstring);
    False where there is none to start."""
    import torch

    if not cpu:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.is_available()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as file:  # "5": reset the peak RSS (Linux >= 4.0)
            file.write("5")
        return True
    except OSError:
        return False


def peak_memory(cpu: bool = False) -> int | None:
    """Bytes at the high-water mark since `reset_peak_memory(cpu)`: what PyTorch reserved on CUDA (None where nothing
    was, e.g. a CPU run on a CUDA machine), or with `cpu` the resident set (`VmHWM`; None where unknown)."""
    import torch

    if not cpu:
        peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
        return int(peak) or None
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


class Timings:
    """Seconds per named stage (a stage entered twice adds up), on CUDA each stage's peak memory (the larger,
    entered twice), and the wall time since creation."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        measured = reset_peak_memory()
        try:
            yield self
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            peak = peak_memory() if measured else None
            if peak is not None:
                self.peaks[stage] = max(peak, self.peaks.get(stage, 0))
        log.info("%s took %.1f s", stage, self.seconds[stage])  # not after an error: its line is all a user sees

    def as_dict(self) -> dict[str, float]:
        """The stages in the order they ran, then `total` (wall time since creation, stages included)."""
        return dict(self.seconds) | {"total": time.perf_counter() - self.started}

    def summary(self) -> str:
        timings = self.as_dict()
        total = timings.pop("total")
        return ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f} s"


def write_timings(output_dir: str | os.PathLike, timings: Timings) -> dict[str, float]:
    """Put the final `timings` (and on CUDA each stage's peak memory, `peak_memory_bytes_by_stage`) into
    `output_dir/metrics.json` (replaced atomically, so the file is never half-written); returns the timings.
    Called after `save_run`, so that `save` and `total` count the saving too."""
    path = Path(output_dir) / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    metrics["timings"] = timings.as_dict()
    if timings.peaks:
        metrics["peak_memory_bytes_by_stage"] = dict(timings.peaks)
    replace_json(path, metrics)
    return metrics["timings"]
