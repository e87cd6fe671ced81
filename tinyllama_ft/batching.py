"""Greedy generation that stops paying for finished answers: transformers' continuous batching.

`model.generate_batch` (transformers 5, the machinery behind `transformers serve --continuous-batching`)
keeps a paged KV cache and schedules tokens, not rows: a finished answer leaves the batch at once and its
place goes to the next prompt, so no row waits for the slowest one of its batch, and prompts need no
padding. Greedy tokens equal `model.generate`'s (tests/test_evaluate.py compares them on stories260k).

Used by `generate` (generation.py) where it applies: one process, unsharded weights (`can_batch_continuously`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import GenerationConfig

log = logging.getLogger(__name__)


def can_batch_continuously(model) -> bool:
    """True where `generate_batch` runs as `generate` would: one process, weights not sharded, a model of
    transformers' own with the method (PEFT wraps it transparently)."""
    from accelerate import PartialState

    from .modeling import is_sharded

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
    with _quiet():
        outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    inner.set_attn_implementation(attention)  # generate_batch switches to a paged kernel; give the model back as it was
    results = list(outputs.values())
    if len(results) != len(prompts) or any(r.error for r in results):
        failed = next((r.error for r in results if r.error), f"{len(results)} of {len(prompts)} answers came back")
        raise RuntimeError(f"continuous batching failed: {failed}")
    return [list(r.generated_tokens) for r in results]


@contextlib.contextmanager
def _quiet():
    """Continuous batching logs its set-up (cache sizing, warm-up) at warning level: keep it at the debug level."""
    logger = logging.getLogger("transformers.generation.continuous_batching")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
