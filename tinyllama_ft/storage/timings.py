"""Where a run's time goes: wall-clock seconds per stage, for `train` and the notebook alike.

    timings = Timings()
    with timings("prepare_data"):
        data = prepare_data(config, tokenizer)
    timings.as_dict()    # {"prepare_data": 1.2, ..., "total": 1.3}: total = wall time since Timings()
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


class Timings:
    """Seconds per named stage (a stage entered twice adds up) and the wall time since creation."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        log.info("%s took %.1f s", stage, self.seconds[stage])  # not after an error: its line is all a user sees

    def as_dict(self) -> dict[str, float]:
        """The stages in the order they ran, then `total` (wall time since creation, stages included)."""
        return dict(self.seconds) | {"total": time.perf_counter() - self.started}

    def summary(self) -> str:
        timings = self.as_dict()
        total = timings.pop("total")
        return ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f} s"


def write_timings(output_dir: str | os.PathLike, timings: Timings) -> dict[str, float]:
    """Put the final `timings` into `output_dir/metrics.json` (replaced atomically, so the file is
    never half-written); returns them. Called after `save_run`, so that `save` and `total` count
    the saving too."""
    path = Path(output_dir) / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    metrics["timings"] = timings.as_dict()
    replace_json(path, metrics)
    return metrics["timings"]
