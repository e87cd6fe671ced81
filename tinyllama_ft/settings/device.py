"""Where a run trains: the accelerator torch sees, the refusal to train a big model on the CPU by surprise, the
one line every run logs about its device and precision, and the command that installs torch's CUDA build.

The rule (`check_training_device`): with no accelerator visible (CUDA, MPS or XPU) a model of more than
`CPU_PARAMETER_LIMIT` parameters (counted from its config.json on the meta device, no weights loaded) is not
trained unless `--use_cpu true` says so. TinyLlama's 1.1 B parameters are over it (its real run would take
days on a CPU); stories260k and the tiny random Llama, and so the smoke preset, are far under it. pip's default
torch on Windows is a CPU-only build: this is where a GPU owner learns it, before anything loads.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import torch

from ..errors import UserError

CPU_PARAMETER_LIMIT = 100_000_000  # the most parameters trained on a CPU unless --use_cpu true
TORCH_INDEX = "https://download.pytorch.org/whl/"
CUDA_BUILDS = (("cu130", (13, 0)), ("cu128", (12, 8)), ("cu126", (12, 6)))  # newest first; torch's wheel indexes
DEFAULT_CUDA_BUILD = "cu128"


def remember_cpu_request(args) -> None:
    """Keep whether the user asked for the CPU (`--use_cpu true`) before precision and launch settings may set
    `use_cpu` themselves (bf16 on a CPU-only machine, several CPU processes)."""
    args.cpu_requested = bool(args.use_cpu)


def accelerator() -> str | None:
    """The accelerator torch trains on here: cuda, xpu or mps; None on a CPU-only machine or build."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def training_device(args) -> str:
    """Where `args` trains: the accelerator, or cpu when there is none or `use_cpu` is set."""
    return "cpu" if args.use_cpu else (accelerator() or "cpu")


def device_line(args) -> str:
    """One line: the device a run trains on and its precision (logged by every run)."""
    device = training_device(args)
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        properties = torch.cuda.get_device_properties(index)
        where = f"cuda:{index} ({properties.name}, {properties.total_memory / 2**30:.1f} GiB)"
    elif device == "cpu":
        where = f"the CPU ({torch.get_num_threads()} threads)"
    else:
        where = device
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return (f"training on {where}{f' x {processes} processes' if processes > 1 else ''}, precision {args.precision} "
            "(frozen base weights in it, LoRA weights in fp32)")


def check_training_device(args, model: str, parameters: int) -> None:
    """Refuse, in one line naming both fixes, to train a model over `CPU_PARAMETER_LIMIT` parameters on the CPU
    when no accelerator is visible and `--use_cpu true` was not given (the module docstring)."""
    if accelerator() is not None or parameters <= CPU_PARAMETER_LIMIT or getattr(args, "cpu_requested", args.use_cpu):
        return
    fix = f"install torch's CUDA build ({install_command()}), or " if platform.system() != "Darwin" else ""
    raise UserError(f"{no_gpu_reason()}, and {model} has {parameters:,} parameters, too many to train on a CPU in "
                    f"reasonable time (more than {CPU_PARAMETER_LIMIT:,}): {fix}pass --use_cpu true to train on the "
                    "CPU anyway")


def no_gpu_reason() -> str:
    """Why torch sees no GPU: a CPU-only build of torch, or a CUDA build that finds no device."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"no GPU is visible: torch {torch.__version__} is a CPU-only build"
    return (f"no GPU is visible: torch {torch.__version__} is a CUDA {torch.version.cuda} build but finds no device "
            "(check the NVIDIA driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)")


def install_command(build: str | None = None) -> str:
    """The pip command that replaces the installed torch with its CUDA build (`build`, default: the newest the
    driver runs, `cuda_build`). --force-reinstall: a CPU build of the same version would otherwise count as
    already installed. The same line works in bash, PowerShell and cmd.exe."""
    return f"pip install --force-reinstall torch --index-url {TORCH_INDEX}{build or cuda_build()}"


def cuda_build(driver: tuple[int, int] | None = None) -> str:
    """The newest of torch's CUDA builds the NVIDIA driver runs (`driver_cuda_version`); `DEFAULT_CUDA_BUILD`
    where no driver answers."""
    driver = driver if driver is not None else driver_cuda_version()
    if driver is None:
        return DEFAULT_CUDA_BUILD
    return next((name for name, version in CUDA_BUILDS if version <= driver), CUDA_BUILDS[-1][0])


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports ("CUDA Version: 12.8" in nvidia-smi), None without one."""
    found = nvidia_smi()
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", found or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvidia_smi() -> str | None:
    """nvidia-smi's report, or None where there is no NVIDIA driver (or it does not answer within 3 s)."""
    command = shutil.which("nvidia-smi")
    if command is None:
        return None
    try:
        return subprocess.run([command], capture_output=True, text=True, timeout=3, encoding="utf-8",
                              errors="replace").stdout
    except (OSError, subprocess.SubprocessError):
        return None
