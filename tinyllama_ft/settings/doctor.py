"""`python -m tinyllama_ft doctor` (alias `env`): what this machine can do, one line a fact, each with its fix
where something is missing: the torch build, the GPU, bf16, FlashAttention, bitsandbytes, the versions of the
libraries the project runs on, free disk and whether the model hub answers. Nothing is downloaded; the hub is
asked once, for at most `HUB_TIMEOUT` seconds, and not at all under HF_HUB_OFFLINE."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import threading
import urllib.request
from pathlib import Path

from .device import CPU_PARAMETER_LIMIT, install_command, nvidia_smi

LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets")
HUB_TIMEOUT = 2.0  # seconds the hub may take to answer
LOW_DISK_GIB = 10  # the real run: the base model (2.2 GB) in the hub cache, checkpoints and the run folder


def report() -> list[str]:
    """The lines `doctor` prints: (name, what was found, and the fix where something is missing)."""
    import torch

    rows = [("python", f"{platform.python_version()} on {platform.system()} {platform.machine()}")]
    rows += torch_rows(torch)
    rows += [(name, library_status(name)) for name in LIBRARIES]
    rows += disk_rows()
    rows.append(("hub", hub_status()))
    width = max(len(name) for name, _ in rows)
    return [f"{name.ljust(width)}  {text}" for name, text in rows]


def torch_rows(torch) -> list[tuple[str, str]]:
    """The torch build, the GPU, bf16, FlashAttention and bitsandbytes."""
    cuda = torch.cuda.is_available()
    build = (f"CUDA {torch.version.cuda} build" if torch.version.cuda else
             f"ROCm {torch.version.hip} build" if getattr(torch.version, "hip", None) else "CPU-only build")
    fix = ""
    if not cuda and platform.system() != "Darwin" and (torch.version.cuda is None or nvidia_smi() is None):
        fix = (f": for an NVIDIA GPU, {install_command()}" if torch.version.cuda is None else
               ": no NVIDIA driver answers (nvidia-smi): install or update it")
    rows = [("torch", f"{torch.__version__}, {build}{fix}")]
    if cuda:
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        properties = torch.cuda.get_device_properties(index)
        rows.append(("gpu", f"{properties.name} ({torch.cuda.device_count()} visible), {total / 2**30:.1f} GiB, "
                            f"{free / 2**30:.1f} GiB free, compute capability {properties.major}.{properties.minor}"))
        rows.append(("bf16", "yes: precision auto trains in bf16" if torch.cuda.is_bf16_supported() else
                             "no (this GPU predates Ampere): precision auto trains in fp16"))
    else:
        other = "mps" if torch.backends.mps.is_available() else (
            "xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else None)
        rows.append(("gpu", f"none visible; trains on {other}" if other else
                            f"none visible: train refuses models over {CPU_PARAMETER_LIMIT:,} parameters unless "
                            "--use_cpu true (the smoke preset runs here)"))
        rows.append(("bf16", "on the CPU only when asked for (--precision bf16); auto trains in fp32"))
    rows.append(("flash-attn", _optional("flash_attn", "flash-attn", cuda, "pip install flash-attn --no-build-isolation "
                                         "(optional: attention falls back to PyTorch SDPA)")))
    rows.append(("bitsandbytes", _optional("bitsandbytes", "bitsandbytes", cuda,
                                           "pip install bitsandbytes (needed for --load_in_4bit, QLoRA)")))
    return rows


def _optional(module: str, package: str, cuda: bool, fix: str) -> str:
    version = _version(package) if importlib.util.find_spec(module) is not None else None
    if version:
        return version + ("" if cuda else " (unused without a CUDA GPU)")
    return f"not installed: {fix}" if cuda else "not installed (CUDA only)"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_status(name: str) -> str:
    """The installed version, checked against this project's requirement where the package is installed."""
    version, wanted = _version(name), _requirement(name)
    if version is None:
        return "missing: pip install -r requirements.txt (in the checkout)"
    if wanted is not None and not wanted.specifier.contains(version, prereleases=True):
        return f'{version}, outside this project\'s {wanted.specifier}: pip install "{wanted}"'
    return version


def _requirement(name: str):
    """This project's requirement on `name` (from the installed package's metadata), None if not installed."""
    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(line) for line in importlib.metadata.requires("tinyllama-ft") or []]
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((r for r in requirements if r.name == name and r.marker is None), None)


def disk_rows() -> list[tuple[str, str]]:
    """Free space where runs are written (here) and where the hub cache keeps downloaded models."""
    from huggingface_hub import constants

    rows = []
    for name, folder in (("disk (here)", Path.cwd()), ("disk (hub cache)", Path(constants.HF_HUB_CACHE))):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None:
            continue
        free = shutil.disk_usage(existing).free / 2**30
        low = f": under {LOW_DISK_GIB} GiB, the real run may not fit; free some space" if free < LOW_DISK_GIB else ""
        rows.append((name, f"{free:.1f} GiB free ({existing}){low}"))
    return rows


def hub_status() -> str:
    """Whether the model hub answers within `HUB_TIMEOUT` seconds; not asked under HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE is set): only models and datasets already in the cache load"
    result: list[str] = []

    def ask():
        try:
            with urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                        timeout=HUB_TIMEOUT) as answer:
                result.append(f"{constants.ENDPOINT} answers (HTTP {answer.status})")
        except Exception as error:  # no network, a proxy, DNS: any failure is the same answer
            result.append(f"{constants.ENDPOINT} unreachable ({type(error).__name__}): check the network or proxy "
                          "(HTTPS_PROXY), or set HF_HUB_OFFLINE=1 to use only the cache")

    thread = threading.Thread(target=ask, daemon=True)  # name resolution ignores urlopen's timeout
    thread.start()
    thread.join(HUB_TIMEOUT + 0.5)
    return result[0] if result else (f"{constants.ENDPOINT} gave no answer within {HUB_TIMEOUT:g} s: check the network "
                                     "or proxy (HTTPS_PROXY), or set HF_HUB_OFFLINE=1 to use only the cache")


def main() -> None:
    print("\n".join(report()))
