"""Experiment trackers (`--report_to`, transformers' integrations): each one named is installed, checked before
anything loads, else one line naming what to pip install. TensorBoard and trackio log offline: TensorBoard's event
files go into the run folder's `runs/`, trackio's local store into `TRACKIO_DIR` (default
~/.cache/huggingface/trackio; `trackio show` opens it), unless `trackio_space_id` names a Space."""

from __future__ import annotations

import importlib.util

from ..errors import UserError

# --report_to name: (the module it needs, the pip package). Others are left to transformers.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
            "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"), "comet_ml": ("comet_ml", "comet-ml")}
EXTRA = {"tensorboard", "trackio"}  # pyproject's `track` extra


def check_trackers(report_to) -> None:
    """Every tracker in `report_to` (a name, a list, "none" or "all") is one transformers knows and is installed."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"--report_to {name}: not a tracker transformers knows: use tensorboard, trackio, none or "
                            f"one of {', '.join(sorted(set(INTEGRATION_TO_CALLBACK) - EXTRA))}")
        module, package = TRACKERS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            also = " (or pip install -e '.[track]' in the checkout)" if name in EXTRA else ""
            raise UserError(f"--report_to {name}: {package} is not installed: pip install {package}{also}")
