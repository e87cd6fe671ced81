"""The evaluation stage: held-out loss over response tokens, ROUGE / BLEU / EOS rate of greedy generations
(`generation.generate`), for the base and the fine-tuned model on the same rows, and one metrics dict."""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..data.encoding import IGNORE_INDEX
from ..model.generation import GENERATION_BATCH_SIZE, generate
from ..model.loading import count_parameters, is_sharded

if TYPE_CHECKING:
    from ..settings.config import Config
    from ..data.prepare import Data

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


def evaluate_model(config: Config, model, tokenizer, data: Data) -> dict:
    """Validation loss/perplexity over response tokens, and generation metrics on the test rows;
    overall and, under `per_category`, for each Dolly category."""
    metrics, per_category = {}, {}
    if data.split["validation"]:
        categories = [data.rows[i].get("category", "") for i in data.split["validation"]]
        loss = evaluate_loss(model, data.examples("validation"), tokenizer.pad_token_id,
                             config.per_device_eval_batch_size, groups=categories, eos_token_id=tokenizer.eos_token_id)
        metrics |= {"eval_loss": loss["loss"], "eval_perplexity": loss["perplexity"], "eval_tokens": loss["tokens"],
                    "eos_logprob": loss["eos_logprob"]}
        for category, group in loss.get("per_group", {}).items():
            per_category[category] = {"eval_loss": group["loss"], "eval_perplexity": group["perplexity"],
                                      "eval_tokens": group["tokens"], "eval_rows": group["rows"],
                                      "eos_logprob": group["eos_logprob"]}
    if data.generate_rows:
        # The last assistant turn, given the turns before it (the system prompt included), against its reference.
        conversations = [data.conversations[i] for i in data.generate_rows]
        predictions = generate(model, tokenizer, [c["messages"][:-1] for c in conversations],
                               max_new_tokens=config.max_new_tokens,
                               batch_size=max(config.per_device_eval_batch_size, GENERATION_BATCH_SIZE))
        scores = score_generations(predictions, [c["messages"][-1]["content"] for c in conversations],
                                   [c["category"] for c in conversations])
        for category, group in scores.pop("per_category", {}).items():
            per_category[category] = per_category.get(category, {}) | group
        metrics |= scores
        metrics["generations"] = [{"row": i, "response": p["text"], "ended": p["ended"]}
                                  for i, p in zip(data.generate_rows, predictions)]
    if per_category:
        metrics["per_category"] = dict(sorted(per_category.items()))
    return metrics


def evaluate_base(config: Config, model, tokenizer, data: Data) -> dict:
    """`evaluate_model` with the adapters switched off: the base model on the very same tokens."""
    with model.disable_adapter():
        return evaluate_model(config, model, tokenizer, data)


def summarize(base: dict, tuned: dict, train_metrics: dict, model, data: Data, config: Config) -> dict:
    """One flat metrics dict: fine-tuned values under their names, the base model's under `base_*`."""
    scalars = lambda d: {k: v for k, v in d.items() if k not in ("generations", "per_category")}  # noqa: E731
    metrics = scalars(tuned) | {f"base_{k}": v for k, v in scalars(base).items()} | train_metrics
    metrics["trainable_parameters"], metrics["total_parameters"] = count_parameters(model)
    metrics["rows"] = {part: len(idx) for part, idx in data.split.items()} | {"excluded": len(data.excluded)}
    if "per_category" in tuned:
        metrics["per_category"] = {"base": base["per_category"], "tuned": tuned["per_category"]}
    return metrics
