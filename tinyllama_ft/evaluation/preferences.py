"""What DPO did, measured the same way before (the SFT model) and after (the DPO model):

* on held-out pairs (`evaluate_pairs`): ``preference_accuracy``, the share of pairs whose chosen response
  (and its EOS) has the higher *mean per-token* log-probability (a summed log-prob mostly measures
  length); ``reward_accuracy`` and ``reward_margin``, the implicit DPO reward against the reference (the
  SFT adapter) exactly as TRL's `DPOTrainer` logs them (``rewards/accuracies``, ``rewards/margins``:
  beta x (summed log P policy - summed log P reference), chosen against rejected); ``chosen_logprob``
  and ``rejected_logprob`` (mean per-token log P);
* what alignment cost on the SFT run's own validation rows and generations (`load_sft_validation`):
  response loss, ``eos_logprob`` and EOS rate (with ROUGE/BLEU beside them).

Before DPO the policy *is* the reference, so its rewards are 0 and ``reward_accuracy`` is 0 by definition.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..data.pairs import pair_examples
from ..errors import UserError
from .dolly import decoder_and_head, pad_batch, score_labelled

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"  # the frozen copy of the SFT adapter TRL's DPOTrainer adds to a PeftModel


@torch.no_grad()
def sequence_logprobs(model, examples: list[dict], pad_token_id: int, batch_size: int = 4
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log P of each example's labelled tokens, how many there are), in fp64, teacher-forced."""
    model.eval()
    device = next(model.parameters()).device
    split = decoder_and_head(model)
    sums = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = pad_batch([examples[i] for i in chunk], pad_token_id, device)
        labels = batch.pop("labels")
        nll, rows, _ = score_labelled(model, batch, labels, split)
        index = torch.tensor(chunk)[rows.cpu()]
        sums.index_add_(0, index, -nll.double().cpu())
        counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    return sums, counts


def reference_adapter(model):
    """A context in which `model` computes the reference: its `ref` adapter (the SFT adapter's frozen copy)."""
    from trl.trainer.utils import use_adapter

    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        raise UserError("the model has no frozen reference adapter: build the DPO trainer first (build_dpo_trainer)")
    return use_adapter(model, REFERENCE_ADAPTER)


def evaluate_pairs(model, encoded_pairs: list[dict], pad_token_id: int, beta: float, batch_size: int = 4,
                   reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Preference metrics of the active adapter on `encoded_pairs` (`encode_pair` output) against the
    reference (the `ref` adapter, or `reference_logps` = (chosen sums, rejected sums) when given)."""
    if not encoded_pairs:
        return {}
    sequences = [example for pair in encoded_pairs for example in pair_examples(pair)]  # chosen, rejected, ...
    sums, counts = sequence_logprobs(model, sequences, pad_token_id, batch_size)
    if reference_logps is None:
        with reference_adapter(model):
            ref, _ = sequence_logprobs(model, sequences, pad_token_id, batch_size)
        reference_logps = (ref[0::2], ref[1::2])
    chosen, rejected = sums[0::2], sums[1::2]
    chosen_mean, rejected_mean = chosen / counts[0::2], rejected / counts[1::2]
    chosen_reward = beta * (chosen - reference_logps[0])
    rejected_reward = beta * (rejected - reference_logps[1])
    return {"preference_accuracy": float((chosen_mean > rejected_mean).double().mean()),
            "reward_accuracy": float((chosen_reward > rejected_reward).double().mean()),
            "reward_margin": float((chosen_reward - rejected_reward).mean()),
            "chosen_reward": float(chosen_reward.mean()), "rejected_reward": float(rejected_reward.mean()),
            "chosen_logprob": float(chosen_mean.mean()), "rejected_logprob": float(rejected_mean.mean()),
            "chosen_logprob_sum": float(chosen.mean()), "rejected_logprob_sum": float(rejected.mean()),
            "pairs": len(encoded_pairs)}


# --- the cost: the SFT run's own validation rows ---------------------------------------------------

SFT_DATA_FIELDS = ("dataset_name", "dataset_format", "columns", "dataset_config", "dataset_split", "system_prompt",
                   "train_size", "eval_size", "test_size", "num_generate", "max_length", "seed")


def load_sft_validation(config, sft_run_config: dict, tokenizer):
    """The SFT run's data rebuilt from its `run_config.json` (its validation rows and generate rows, at
    most `config.num_generate` of those), checked against its `split.json` so the rows are its own."""
    from ..settings.config import parse_config
    from ..settings.paths import find_recorded_data
    from ..data.prepare import prepare_data

    fields = {k: sft_run_config[k] for k in SFT_DATA_FIELDS if sft_run_config.get(k) is not None}
    if "dataset_name" in fields:  # a bundled sample is recorded by its name and hash
        fields["dataset_name"] = find_recorded_data(fields["dataset_name"])
    sft_config = parse_config(**fields, per_device_eval_batch_size=config.per_device_eval_batch_size,
                              max_new_tokens=config.max_new_tokens, tokenization_cache=False)
    try:
        data = prepare_data(sft_config, tokenizer)
    except UserError as error:
        raise UserError(f"the SFT run's data cannot be read for the alignment cost ({error}); make it readable, or "
                        "pass --alignment_eval false") from None
    saved = Path(config.adapter) / "split.json"
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")).get("validation") != data.split["validation"]:
        raise UserError(f"{sft_config.dataset_name} no longer gives the SFT run's validation rows ({saved}): the data "
                        "changed since; restore it, or pass --alignment_eval false")
    data.generate_rows = data.generate_rows[: config.num_generate]
    return sft_config, data


def evaluate_stage(config, model, tokenizer, pairs, sft_data=None) -> dict:
    """Everything measured at one point (before or after DPO): the held-out pairs, and the SFT rows."""
    from .dolly import evaluate_model

    result = {"pairs": evaluate_pairs(model, pairs.examples("validation"), tokenizer.pad_token_id, config.beta,
                                      config.per_device_eval_batch_size)}
    if sft_data is not None:
        sft_config, data = sft_data
        result["sft_rows"] = evaluate_model(sft_config, model, tokenizer, data)
        result["generations"] = result["sft_rows"].pop("generations", [])
    model.train()
    return result


def summarize_dpo(before: dict, after: dict, train_metrics: dict, model, pairs) -> dict:
    """One flat metrics dict: the DPO model's values under their names, the SFT model's under `sft_*`;
    the training loop's under `train_*`."""
    from ..model.loading import count_parameters

    def flat(stage: dict) -> dict:
        rows = {k: v for k, v in stage.get("sft_rows", {}).items() if k != "per_category"}
        return stage["pairs"] | rows

    metrics = flat(after) | {f"sft_{k}": v for k, v in flat(before).items()} | train_metrics
    trainable, total = count_parameters(model)
    frozen_copy = sum(p.numel() for name, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in name)
    metrics["trainable_parameters"], metrics["total_parameters"] = trainable, total - frozen_copy  # as SFT counts
    metrics["rows"] = {part: len(idx) for part, idx in pairs.split.items()} | {"excluded": len(pairs.excluded)}
    metrics["excluded_by_reason"] = pairs.stats()["excluded_by_reason"]
    return metrics
