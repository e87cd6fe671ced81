"""The device and precision decisions both stages' configurations share: what `precision=auto` becomes
on this machine, the transformers flags that must agree with it, and the features that need CUDA."""

from __future__ import annotations

import importlib.util

import torch

from ..errors import UserError


def resolve_precision(precision: str) -> str:
    """`auto` becomes bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("precision=fp16 needs a CUDA GPU and none is visible: use --precision auto, bf16 or fp32")
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return precision


def set_precision(args, precision: str) -> None:
    """Resolve `precision` onto training arguments `args` with transformers' `bf16`/`fp16` to match; bf16 on a
    CPU-only machine also sets `use_cpu`, without which transformers refuses bf16 there. Without a GPU the data
    loader pins no memory (there is nothing to pin it for: torch warns at every epoch otherwise)."""
    args.precision = resolve_precision(precision)
    args.bf16, args.fp16 = args.precision == "bf16", args.precision == "fp16"
    if args.bf16 and not torch.cuda.is_available() and not torch.backends.mps.is_available():
        args.use_cpu = True
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False


def compute_dtype(config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.precision]


def require_cuda_and(flag: str, module: str, package: str) -> None:
    if not torch.cuda.is_available():
        raise UserError(f"{flag} needs a CUDA GPU and none is visible: drop --{flag}")
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{flag} needs {package}: pip install {package}")
