"""Held-out loss over response tokens, batched greedy generation, and ROUGE / BLEU / EOS rate."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .batching import can_batch_continuously
from .data import IGNORE_INDEX, encode_prompt, prompt_messages
from .errors import UserError

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], pad_token_id: int, batch_size: int = 4,
                  groups: list[str] | None = None, progress: bool = True, eos_token_id: int | None = None,
                  labelled_only: bool = True) -> dict:
    """Token-weighted mean loss over the labelled (response + EOS) tokens, and its perplexity;
    with `groups` (one label per example, e.g. its category) also `per_group` losses.

    With `eos_token_id`, also `eos_logprob`: the mean natural-log probability of the labelled tokens
    that are the EOS (the one closing each assistant response), teacher-forced, from the same forward
    pass (None where no EOS is labelled), and `eos_tokens`, how many there were.

    `labelled_only` (default): the decoder runs on every position, the LM head only on the positions
    whose next token is labelled (`score_labelled`); `False`: the full logits at every position, as
    before (same numbers to fp32 rounding; tests/test_evaluate.py). Sharded models (FSDP, ZeRO-3)
    always take the full forward. Rows are batched by length (less padding). Under several processes
    each scores its share of the rows and the sums are added up."""
    model.eval()
    device = next(model.parameters()).device
    groups = groups or [""] * len(examples)
    names = sorted(set(groups))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    split = decoder_and_head(model) if labelled_only else None
    state = PartialState()
    totals = torch.zeros(len(names), 5, dtype=torch.float64, device=device)  # NLL, tokens, rows, EOS log-prob, EOS
    with state.split_between_processes(order) as mine:
        for start in tqdm(range(0, len(mine), batch_size), desc="eval loss", leave=False,
                          disable=not (progress and state.is_main_process)):
            chunk = mine[start:start + batch_size]
            batch = pad_batch([examples[i] for i in chunk], pad_token_id, device)
            labels = batch.pop("labels")
            nll, rows, targets = score_labelled(model, batch, labels, split)
            nll, row_group = nll.double(), torch.tensor([names.index(groups[i]) for i in chunk], device=device)
            is_eos = (targets == eos_token_id).double() if eos_token_id is not None else torch.zeros_like(nll)
            token_group = row_group[rows]
            totals[:, 0].index_add_(0, token_group, nll)
            totals[:, 1].index_add_(0, token_group, torch.ones_like(nll))
            totals[:, 2].index_add_(0, row_group, torch.ones_like(row_group, dtype=torch.float64))
            totals[:, 3].index_add_(0, token_group, -nll * is_eos)
            totals[:, 4].index_add_(0, token_group, is_eos)
    if state.num_processes > 1:
        totals = reduce(totals, reduction="sum")
    with_eos = eos_token_id is not None
    result = _loss(totals.sum(0), with_eos)
    if len(names) > 1:
        result["per_group"] = {name: _loss(totals[i], with_eos) for i, name in enumerate(names)}
    return result


def score_labelled(model, batch: dict, labels: torch.Tensor, split=None):
    """(NLL of every labelled next token, its row in the batch, its label id), in fp32.

    With `split` (`decoder_and_head(model)`): the decoder's hidden states, then the LM head on the
    labelled positions only. Without: the model's full logits at every position (the seed's way)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if split is None:
        logits = model(**batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                                                ignore_index=IGNORE_INDEX)[mask]
    else:
        decoder, head = split
        hidden = decoder(**batch, use_cache=False).last_hidden_state[:, :-1]
        logits = head(hidden[mask]).float()
        nll = torch.nn.functional.cross_entropy(logits, targets[mask], reduction="none")
    return nll, mask.nonzero()[:, 0], targets[mask]


def decoder_and_head(model):
    """(decoder, LM head) of a causal LM, PEFT-wrapped or not (adapters on or off: the LoRA layers
    sit inside the decoder), so that the head can score chosen positions only. None, with the reason
    logged once, where the logits are not simply head(hidden states): sharded weights (FSDP, DeepSpeed
    ZeRO-3: the decoder called alone would bypass the root module's parameter gathering) or a model
    that scales or caps its logits."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    reason = None
    if is_sharded(model):
        reason = "its weights are sharded (FSDP / ZeRO-3)"
    elif not isinstance(inner, PreTrainedModel) or inner.get_output_embeddings() is None:
        reason = f"{type(inner).__name__} has no separate LM head"
    else:
        text = inner.config.get_text_config()
        scaled = [k for k in _LOGIT_SCALING if getattr(text, k, None) not in (None, 1.0)]
        reason = f"its config scales the logits ({', '.join(scaled)})" if scaled else None
    if reason is not None:
        _log_once(f"evaluate_loss: full logits at every position, as {reason}")
        return None
    return inner.base_model, inner.get_output_embeddings()


_LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


def is_sharded(model) -> bool:
    """True when parameters are split across processes: FSDP2 DTensors, FSDP1 wrappers, DeepSpeed ZeRO-3."""
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support shards nothing
        return False
    return (any(isinstance(p, DTensor) for p in model.parameters())
            or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()))


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def _loss(total: torch.Tensor, with_eos: bool = False) -> dict:
    mean = float(total[0]) / max(float(total[1]), 1.0)
    result = {"loss": mean, "perplexity": math.exp(mean), "tokens": int(total[1]), "rows": int(total[2])}
    if with_eos:
        result["eos_logprob"] = float(total[3]) / float(total[4]) if total[4] else None
        result["eos_tokens"] = int(total[4])
    return result


def pad_batch(examples: list[dict], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (with pad) and `labels` (with -100); attention mask 0 on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": labels.to(device)}


GENERATION_BATCH_SIZE = 32  # prompts per generate() call; 8 before (bench --eval measures both)


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
    `tokens` (how many it generated, the EOS included).
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
    model.eval()
    device = next(model.parameters()).device
    results: list[dict | None] = [None] * len(prompts)
    state = PartialState()
    merge = can_merge_lora(model) if merge_lora is None else merge_lora
    with state.split_between_processes(sorted(range(len(prompts)), key=lambda i: len(prompts[i]))) as order, \
            (merged_lora(model) if merge else contextlib.nullcontext()):
        if batching == "continuous" and can_batch_continuously(model):
            from .batching import generate_continuously

            answers = generate_continuously(model, [prompts[i] for i in order], max_new_tokens,
                                            tokenizer.eos_token_id, tokenizer.pad_token_id)
            for index, new in zip(order, answers):
                results[index] = _answer(tokenizer, new)
        else:
            _generate_into(results, order, model, tokenizer, prompts, max_new_tokens, batch_size, device,
                           progress and state.is_main_process)
    if state.num_processes > 1:
        results = [next(r for r in gathered if r is not None)
                   for gathered in zip(*gather_object([results]))]
    return results[0] if single else results


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
            results[index] = _answer(tokenizer, output[row, width:].tolist())


def _answer(tokenizer, new: list[int]) -> dict:
    """The text up to the first EOS, whether there was one, and how many tokens were generated (EOS included)."""
    ended = tokenizer.eos_token_id in new
    new = new[: new.index(tokenizer.eos_token_id)] if ended else new
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "ended": ended, "tokens": len(new) + ended}


def score_generations(predictions: list[dict], references: list[str], categories: list[str] | None = None) -> dict:
    """ROUGE-1/2/L (F1, rouge-score), corpus BLEU (sacrebleu) and EOS rate, overall and per category."""
    categories = categories or [""] * len(references)
    scores = _score(predictions, references)
    by_category = defaultdict(list)
    for index, category in enumerate(categories):
        by_category[category].append(index)
    if len(by_category) > 1:
        scores["per_category"] = {
            cat: _score([predictions[i] for i in idx], [references[i] for i in idx]) | {"rows": len(idx)}
            for cat, idx in sorted(by_category.items())}
    return scores


def _score(predictions: list[dict], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = defaultdict(float)
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction["text"]).items():
            rouge[name] += score.fmeasure / len(references)
    bleu = sacrebleu.corpus_bleu([p["text"] for p in predictions], [references]).score
    eos_rate = sum(p["ended"] for p in predictions) / len(predictions)
    return {"rouge1": rouge["rouge1"], "rouge2": rouge["rouge2"], "rougeL": rouge["rougeL"], "bleu": bleu,
            "eos_rate": eos_rate}
