"""Greedy generation that stops paying for finished answers: transformers' continuous batching.

`model.generate_batch` (transformers 5, the machinery behind `transformers serve --continuous-batching`)
keeps a paged KV cache and schedules tokens, not rows: a finished answer leaves the batch at once and its
place goes to the next prompt, so no row waits for the slowest one of its batch, and prompts need no
padding. Greedy tokens equal `model.generate`'s (tests/test_evaluate.py compares them on stories260k).

Used by `generate` (generation.py) where it applies: one process, unsharded weights (`can_batch_continuously`).
"""

from __future__ import annotations

import contextlib
import gc
import logging

import torch
from transformers import GenerationConfig

log = logging.getLogger(__name__)


def can_batch_continuously(model) -> bool:
    """True where `generate_batch` runs as `generate` would: one process, weights not sharded, a model of
    transformers' own with the method (PEFT wraps it transparently)."""
    from accelerate import PartialState

    from .loading import is_sharded

    return (PartialState().num_processes == 1 and not is_sharded(model) and hasattr(model, "generate_batch")
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@torch.no_grad()
def generate_continuously(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int,
                          pad_token_id: int) -> list[list[int]]:
    """The greedy new tokens for each prompt (ids; the EOS included where the model emitted it)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = inner.config._attn_implementation
    with _quiet(), _heap_frozen():
        outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False,
                                       continuous_batching_config=cache_config(inner, prompts, max_new_tokens))
    inner.set_attn_implementation(attention)  # generate_batch switches to a paged kernel; give the model back as it was
    results = list(outputs.values())
    if len(results) != len(prompts) or any(r.error for r in results):
        failed = next((r.error for r in results if r.error), f"{len(results)} of {len(prompts)} answers came back")
        raise RuntimeError(f"continuous batching failed: {failed}")
    return [list(r.generated_tokens) for r in results]


PAGE_TOKENS = 256  # tokens per cache page (transformers' default)
MAX_BATCH_TOKENS = 1024  # tokens per step (prefill chunks and decode tokens together)
CACHE_SHARE = 0.25  # the cache may take at most this share of the free memory


def cache_config(model, prompts: list[list[int]], max_new_tokens: int):
    """A paged cache sized by the work, not by the machine: room for every answer at once (its prompt and its
    budget), at most CACHE_SHARE of the free memory. Left to itself, transformers sizes the cache at 60-90% of
    the device's memory, which on a CPU is the machine's RAM (a 14 GB process on a 24 GB box, killed by the
    kernel) and on a GPU all that training will want back."""
    return _sized(model, sum(-(-(len(p) + max_new_tokens) // PAGE_TOKENS) for p in prompts) + 1)


def serving_cache_config(model, concurrent: int = 8):
    """The server's cache: room for `concurrent` conversations of the model's whole context at once, at most
    CACHE_SHARE of the free memory (more requests wait their turn)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    context = inner.config.get_text_config().max_position_embeddings
    return _sized(model, concurrent * -(-context // PAGE_TOKENS))


def _sized(model, wanted: int):
    from transformers import ContinuousBatchingConfig

    from ..settings.memory import free_memory_bytes

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype = next(model.parameters()).dtype
    bytes_per_block = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize * PAGE_TOKENS  # K and V
    room = int(CACHE_SHARE * free_memory_bytes(next(model.parameters()).device) // bytes_per_block)
    return ContinuousBatchingConfig(page_size=PAGE_TOKENS, num_blocks=max(1, min(wanted, room)),
                                    max_batch_tokens=MAX_BATCH_TOKENS)


@contextlib.contextmanager
def _heap_frozen():
    """Within this block the objects alive at its start are left out of garbage collections (`gc.freeze`).
    `generate_batch` runs two full collections on its way out (transformers' cleanup after CUDA graphs), and a
    full collection walks every object alive: 0.4 s each for the ~470,000 of an evaluation process holding its
    dataset, 0.8 s of a 3.6 s call generating 20 answers on the CPU bench (docs/PERFORMANCE.md). Frozen, they walk only
    what the call made. A heap already frozen by the caller (a server's start-up, say) is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _quiet():
    """Continuous batching logs its set-up (cache sizing, warm-up, advice on flash attention: 22 lines a `train`)
    with a handler of its own: within this block only its errors show. transformers 5.24 logs as
    "ContinuousBatchingLogger", earlier versions under their module's name."""
    loggers = [logging.getLogger(name) for name in CB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


CB_LOGGERS = ("ContinuousBatchingLogger", "transformers.generation.continuous_batching")
