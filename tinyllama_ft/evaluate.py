"""Held-out loss over response tokens, batched greedy generation, and ROUGE / BLEU / EOS rate."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, encode_prompt, to_example
from .errors import UserError


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], pad_token_id: int, batch_size: int = 4,
                  groups: list[str] | None = None, progress: bool = True) -> dict:
    """Token-weighted mean loss over the labelled (response + EOS) tokens, and its perplexity;
    with `groups` (one label per example, e.g. its category) also `per_group` losses.

    Rows are batched by length (less padding); only one batch's logits exist at a time. Under
    several processes each scores its share of the rows and the sums are added up."""
    model.eval()
    device = next(model.parameters()).device
    groups = groups or [""] * len(examples)
    names = sorted(set(groups))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    state = PartialState()
    totals = torch.zeros(len(names), 3, dtype=torch.float64, device=device)  # NLL sum, tokens, rows
    with state.split_between_processes(order) as mine:
        for start in tqdm(range(0, len(mine), batch_size), desc="eval loss", leave=False,
                          disable=not (progress and state.is_main_process)):
            chunk = mine[start:start + batch_size]
            batch = pad_batch([examples[i] for i in chunk], pad_token_id, device)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none",
                                                    ignore_index=IGNORE_INDEX)
            counted = labels[:, 1:] != IGNORE_INDEX
            for row, index in enumerate(chunk):
                totals[names.index(groups[index])] += torch.stack(
                    [nll[row].sum().double(), counted[row].sum().double(), torch.ones((), device=device).double()])
    if state.num_processes > 1:
        totals = reduce(totals, reduction="sum")
    result = _loss(totals.sum(0))
    if len(names) > 1:
        result["per_group"] = {name: _loss(totals[i]) for i, name in enumerate(names)}
    return result


def _loss(total: torch.Tensor) -> dict:
    mean = float(total[0]) / max(float(total[1]), 1.0)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(total[1]), "rows": int(total[2])}


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


@torch.no_grad()
def generate(model, tokenizer, instructions: list[str] | str, contexts: list[str] | str | None = None,
             max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Greedy responses, formatted exactly as in training; batched with left padding.

    Returns one dict per input: `text` (the response) and `ended` (the model emitted EOS itself).
    Under several processes each generates its share and every process gets all results."""
    single = isinstance(instructions, str)
    instructions = [instructions] if single else list(instructions)
    contexts = [contexts or ""] * len(instructions) if contexts is None or isinstance(contexts, str) else contexts
    if any(not isinstance(i, str) or not i.strip() for i in instructions):
        raise UserError("an instruction is empty: pass the text to respond to")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    prompts = [encode_prompt(tokenizer, to_example({"instruction": i, "context": c, "response": "-"})["prompt"])
               for i, c in zip(instructions, contexts)]
    model.eval()
    device = next(model.parameters()).device
    results: list[dict | None] = [None] * len(prompts)
    state = PartialState()
    with state.split_between_processes(sorted(range(len(prompts)), key=lambda i: len(prompts[i]))) as order:
        _generate_into(results, order, model, tokenizer, prompts, max_new_tokens, batch_size, device,
                       progress and state.is_main_process)
    if state.num_processes > 1:
        results = [next(r for r in gathered if r is not None)
                   for gathered in zip(*gather_object([results]))]
    return results[0] if single else results


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
            new = output[row, width:].tolist()
            ended = tokenizer.eos_token_id in new
            new = new[: new.index(tokenizer.eos_token_id)] if ended else new
            results[index] = {"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "ended": ended}


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
