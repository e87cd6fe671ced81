"""Batched greedy generation, formatted exactly as in training, and the one cut-at-EOS-and-decode."""

from __future__ import annotations

import contextlib

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from peft import PeftModel
from tqdm.auto import tqdm

from ..data.encoding import encode_prompt
from ..data.formats import prompt_messages
from ..errors import UserError
from .batching import can_batch_continuously, generate_continuously
from .loading import is_sharded

GENERATION_BATCH_SIZE = 32  # prompts per generate() call; 8 before (benchmarks/eval_paths.py measures both)


@torch.no_grad()
def generate(model, tokenizer, instructions: list[str] | str | list[list[dict]] | list[dict],
             contexts: list[str] | str | None = None, max_new_tokens: int = 256,
             batch_size: int = GENERATION_BATCH_SIZE, progress: bool = True, system_prompt: str | None = None,
             merge_lora: bool | None = None, batching: str = "continuous") -> list[dict]:
    """Greedy responses, formatted exactly as in training; batched with left padding, prompts
    sorted by length so that a batch holds prompts of similar length.

    `instructions`: instructions (with `contexts`), or conversations so far (lists of `{role, content}`),
    one or many; `system_prompt` goes first where a conversation has no system turn (`prompt_messages`).
    Returns one dict per input: `text` (the response), `ended` (the model emitted EOS itself) and
    `tokens` (how many it generated, the EOS included). `max_new_tokens` is capped at what the context leaves
    after the longest prompt (`new_token_budget`).
    `merge_lora`: run with the LoRA weights merged into the base (one matmul per projection instead
    of three) and put the exact original weights back afterwards; None (default) merges where that is
    exact to fp32 rounding: active LoRA adapters on fp32, unsharded `nn.Linear` weights
    (`can_merge_lora`); never for bf16/fp16/4-bit bases, whose merged weights would be rounded.
    `batching`: "continuous" (default) schedules tokens, not rows (transformers' continuous batching,
    `batching.py`): an answer that ends leaves the batch at once, so nobody waits for the slowest answer
    of a batch, and `batch_size` does not apply; used where it applies (`can_batch_continuously`: one
    process, unsharded weights), else, and with "static", batches of `batch_size` prompts of similar length,
    left-padded, each run until its longest answer ends (`model.generate`). Same greedy tokens either way.
    Under several processes each generates its share and every process gets all results."""
    if batching not in ("continuous", "static"):
        raise UserError(f"batching must be continuous or static, got {batching!r}")
    single = isinstance(instructions, str) or (bool(instructions) and isinstance(instructions[0], dict))
    instructions = [instructions] if single else list(instructions)
    contexts = [contexts or ""] * len(instructions) if contexts is None or isinstance(contexts, str) else contexts
    if any(not (i.strip() if isinstance(i, str) else i) for i in instructions):
        raise UserError("an instruction is empty: pass the text to respond to")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    prompts = [encode_prompt(tokenizer, prompt_messages(i, c, system_prompt)) for i, c in zip(instructions, contexts)]
    max_new_tokens = new_token_budget(model, prompts, max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    results: list[dict | None] = [None] * len(prompts)
    state = PartialState()
    merge = can_merge_lora(model) if merge_lora is None else merge_lora
    with state.split_between_processes(sorted(range(len(prompts)), key=lambda i: len(prompts[i]))) as order, \
            (merged_lora(model) if merge else contextlib.nullcontext()):
        if batching == "continuous" and can_batch_continuously(model):
            answers = generate_continuously(model, [prompts[i] for i in order], max_new_tokens,
                                            tokenizer.eos_token_id, tokenizer.pad_token_id)
            for index, new in zip(order, answers):
                results[index] = decode_answer(tokenizer, new)
        else:
            _generate_into(results, order, model, tokenizer, prompts, max_new_tokens, batch_size, device,
                           progress and state.is_main_process)
    if state.num_processes > 1:
        results = [next(r for r in gathered if r is not None)
                   for gathered in zip(*gather_object([results]))]
    return results[0] if single else results


def context_length(model) -> int:
    """The model's positions: prompt and answer together must fit in them."""
    return int(model.config.max_position_embeddings)


def new_token_budget(model, prompts: list[list[int]], max_new_tokens: int) -> int:
    """`max_new_tokens`, capped at the positions the longest prompt leaves (a model generates nothing sound past
    its context, and a budget of a billion tokens would be allocated before the first one). A prompt that fills
    the context is refused, as chat and the server refuse it."""
    longest = max(map(len, prompts), default=0)
    room = context_length(model) - longest
    if room < 1:
        raise UserError(f"the prompt is {longest} tokens, the model's context {context_length(model)}: shorten it")
    return min(max_new_tokens, room)


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def can_merge_lora(model) -> bool:
    """True where merging the active LoRA adapters changes nothing but fp32 rounding: a PeftModel
    with adapters enabled, every adapted layer an unsharded `nn.Linear` with fp32 weights, no DoRA."""
    layers = _lora_layers(model) if isinstance(model, PeftModel) else []
    return bool(layers) and not is_sharded(model) and all(
        not layer.disable_adapters and not layer.merged and type(layer.get_base_layer()) is torch.nn.Linear
        and layer.get_base_layer().weight.dtype == torch.float32
        and not any(layer.use_dora.get(name, False) for name in layer.active_adapters)
        for layer in layers)


@contextlib.contextmanager
def merged_lora(model):
    """Within this block the active LoRA adapters are merged into the base weights; afterwards they
    are unmerged and the base weights are restored exactly (unmerging alone leaves rounding error)."""
    layers = _lora_layers(model)
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.get_base_layer().weight.copy_(weight)


def _generate_into(results, order, model, tokenizer, prompts, max_new_tokens, batch_size, device, progress):
    for start in tqdm(range(0, len(order), batch_size), desc="generating", leave=False, disable=not progress):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in chunk])
        attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(prompts[i]) for i in chunk])[:, None])
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.long().to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row, index in enumerate(chunk):
            results[index] = decode_answer(tokenizer, output[row, width:].tolist())


def decode_answer(tokenizer, new_ids: list[int]) -> dict:
    """The answer in the ids a model generated: cut at the first EOS and decoded without special tokens,
    stripped (`text`); whether the model emitted that EOS itself (`ended`); how many ids it generated, the
    EOS included (`tokens`). `generate`, evaluation and `chat` all read answers this way."""
    ended = tokenizer.eos_token_id in new_ids
    kept = new_ids[: new_ids.index(tokenizer.eos_token_id)] if ended else new_ids
    return {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(), "ended": ended,
            "tokens": len(kept) + ended}
