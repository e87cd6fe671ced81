"""`gradient_checkpointing="auto"`: recompute activations only where the worst-case step would not fit.

The rule (`checkpointing_needed`): measure the bytes autograd keeps for the backward pass in one forward,
without checkpointing, of the worst-case micro-batch (the `per_device_train_batch_size` longest training
rows, laid out as the trainer lays them out: padding-free, padded or packed); checkpointing stays off when
those bytes are at most `MARGIN` (half) of the memory still free on the device, and is turned on otherwise.
The other half covers what the forward does not keep: the backward's activation gradients, the LM head's
tiles, the optimizer's first step and the allocator's slack. Free memory (`free_memory_bytes`):

* CUDA: the per-process limit (`torch.cuda.set_per_process_memory_fraction`, default all of the card)
  minus what PyTorch has reserved, and at most what the driver reports free;
* CPU: the available RAM, and at most what a cgroup (`memory.max`) or an address-space limit
  (`RLIMIT_AS`) still allows this process.

A forward that fails for lack of memory is a measurement too: it needs checkpointing.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from .validation import refuse

log = logging.getLogger(__name__)

MARGIN = 0.5  # the saved activations may take at most this share of the free memory


def checkpointing_value(value) -> bool | str:
    """True, False or "auto", from a bool or its spellings (YAML, the command line, the notebook)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise refuse("gradient_checkpointing", value, "must be auto, true or false", "auto")


def checkpointing_needed(activation_bytes: int | None, free_bytes: int) -> bool:
    """The rule: on when the activations are unknown (the forward ran out of memory) or over MARGIN x free."""
    return activation_bytes is None or activation_bytes > MARGIN * free_bytes


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process can still take on `device` (see the module docstring)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        limit = total * torch.cuda.get_per_process_memory_fraction(index)
        return int(max(0, min(free, limit - torch.cuda.memory_reserved(index))))
    limits = [_available_ram()]
    cgroup = _cgroup_room()
    if cgroup is not None:
        limits.append(cgroup)
    address_space = _address_space_room()
    if address_space is not None:
        limits.append(address_space)
    return int(max(0, min(limits)))


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def _cgroup_room() -> int | None:
    """cgroup v2 `memory.max - memory.current` of this process's group, None where unlimited or unknown."""
    try:
        group = Path("/proc/self/cgroup").read_text(encoding="utf-8").strip().splitlines()[0].split(":", 2)[2]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text(encoding="utf-8").strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text(encoding="utf-8").strip())
    except (OSError, IndexError, ValueError):
        return None


def _address_space_room() -> int | None:
    """RLIMIT_AS minus the address space in use, None where unlimited (or not on Unix)."""
    if sys.platform == "win32":
        return None
    import resource

    import psutil

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return soft - psutil.Process().memory_info().vms


def worst_case_rows(examples: list[dict], batch_size: int, packing: bool, max_length: int) -> list[dict]:
    """The `batch_size` longest rows (`input_ids`, `labels`); with packing, one pack of the longest that fit."""
    rows = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)[:batch_size]
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
    if not packing:
        return rows
    packed, total = [], 0
    for row in rows:
        if total + len(row["input_ids"]) <= max_length:
            packed.append(row)
            total += len(row["input_ids"])
    return [{"input_ids": sum((r["input_ids"] for r in packed), []), "labels": sum((r["labels"] for r in packed), []),
             "seq_lengths": [len(r["input_ids"]) for r in packed]}]


def worst_case_batch(rows: list[dict], padding_free: bool, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """The decoder's inputs for `rows` as the trainer feeds them: one sequence with restarting position ids
    (padding-free, or a pack), else right-padded with an attention mask."""
    if padding_free or len(rows) == 1:
        lengths = [n for r in rows for n in (r.get("seq_lengths") or [len(r["input_ids"])])]
        ids = torch.tensor([sum((r["input_ids"] for r in rows), [])])
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        return {"input_ids": ids.to(device), "position_ids": positions.to(device)}
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def activation_bytes(model, batch: dict) -> int | None:
    """Bytes autograd saves for backward in one training-mode forward of the decoder on `batch`, without
    checkpointing (each storage counted once, parameters excluded); None if the forward ran out of memory."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT-wrapped or not
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else model  # without the LM head
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor.detach()  # not `tensor`: an op's own output saved with its grad_fn is a cycle gc never frees

    was_training = model.training
    model.train()
    cuda = [batch["input_ids"].device.index or 0] if batch["input_ids"].device.type == "cuda" else []
    try:  # the random state is put back: dropout here must not change the masks training then draws
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = decoder(**batch, use_cache=False)
        del output
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "memory" not in str(error).lower():
            raise
        return None
    finally:
        model.train(was_training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return sum(saved.values())


def decide_checkpointing(config, model, data, pad_token_id: int) -> dict:
    """Resolve `config.gradient_checkpointing` ("auto", True or False) to a bool, in place; return the
    decision (`on`, and for "auto" what it was measured on and `predicted_peak_bytes`: the most the training stage
    may hold, what was resident before the measurement plus the activations with the room `MARGIN` keeps beside
    them; `benchmarks/memory_stages.py` measures it)."""
    if config.gradient_checkpointing != "auto":
        return {"on": bool(config.gradient_checkpointing), "rule": "set"}
    device = next(model.parameters()).device
    free, resident = free_memory_bytes(device), resident_bytes(device)
    rows = worst_case_rows(data.examples("train"), config.per_device_train_batch_size, config.packing,
                           config.max_length)
    need = activation_bytes(model, worst_case_batch(rows, config.padding_free, pad_token_id, device))
    on = _agreed(checkpointing_needed(need, free), device)
    tokens = sum(len(r["input_ids"]) for r in rows)
    log.info("gradient_checkpointing auto -> %s: the worst-case micro-batch (%d rows, %d tokens) keeps %s for backward "
             "without it; %s free on %s (off when at most %d%% of free)", on,
             len(rows), tokens, "more than fits" if need is None else f"{need / 2**20:.0f} MiB",
             f"{free / 2**20:.0f} MiB", device.type, MARGIN * 100)
    set_checkpointing(config, on)
    return {"on": on, "rule": "auto", "activation_bytes": need, "free_bytes": free, "tokens": tokens, "margin": MARGIN,
            "resident_bytes": resident, "predicted_peak_bytes": None if need is None else int(resident + need / MARGIN)}


def resident_bytes(device: torch.device) -> int:
    """What this process holds now: on CUDA what PyTorch reserved, else the resident set."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def _agreed(on: bool, device) -> bool:
    """Under several processes: on for all when any one needs it (their steps must match)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return on
    flag = torch.tensor([int(on)], device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def set_checkpointing(config, on: bool) -> None:
    config.gradient_checkpointing = config.activation_checkpointing = on
