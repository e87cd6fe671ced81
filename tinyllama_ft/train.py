"""The run, stage by stage: data -> model -> base evaluation -> training -> evaluation -> save.

Each stage is one function the notebook calls on its own; `train` chains them for the command line.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed
from transformers.trainer import rotate_checkpoints
import trl.trainer.utils as trl_utils
from trl import SFTTrainer

from .artifacts import check_output_dir, resume_path, save_run
from .config import Config, check_model_fits, compute_dtype
from .data import (category_counts, check_system_prompt, encode_rows, exclusion_counts, length_stats,
                   load_rows, split_rows, stratified_sample, to_conversations)
from .errors import UserError
from .memory import decide_checkpointing
from .evaluate import GENERATION_BATCH_SIZE, evaluate_loss, generate, score_generations
from .modeling import check_target_modules, count_parameters, load_model, load_tokenizer, wrap_lora
from .timings import Timings, write_timings

log = logging.getLogger(__name__)


@dataclass
class Data:
    """The rows (columns renamed as `columns` says), their conversations (`to_conversation`), their
    encodings, what was excluded and why, and the split (row indices)."""

    rows: list[dict]
    encoded: dict[int, dict]
    excluded: dict[int, str]
    split: dict[str, list[int]]
    lengths: dict[int, int] = field(default_factory=dict)  # token length of every encodable row, kept or not
    generate_rows: list[int] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)  # one per row: {"messages": [...], "category": str}

    def examples(self, part: str) -> list[dict]:
        return [self.encoded[i] for i in self.split[part]]

    def dataset(self, part: str) -> Dataset:
        return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in self.examples(part)])

    def stats(self, max_length: int) -> dict:
        lengths = [len(e["input_ids"]) for e in self.encoded.values()]
        return {"tokens": length_stats(list(self.lengths.values()), max_length), "excluded": len(self.excluded),
                "excluded_by_reason": exclusion_counts(self.excluded),
                "categories": {part: category_counts(self.rows, idx) for part, idx in self.split.items()},
                "response_token_share": sum(sum(l != -100 for l in e["labels"]) for e in self.encoded.values())
                / max(sum(lengths), 1)}


def tokenization_cache_dir() -> Path:
    """Under the datasets cache, so that HF_DATASETS_CACHE / HF_HOME move it with the rest."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "tinyllama_ft"


def prepare_data(config: Config, tokenizer) -> Data:
    """Load, validate, format (any `dataset_format`, with the `system_prompt`), encode and split the rows;
    rows that cannot be used (over `max_length`, special-token text, broken conversations) are dropped
    and counted by reason."""
    rows = load_rows(config.dataset_name, config.dataset_config, config.dataset_split, config.columns,
                     config.dataset_format)
    wanted = config.train_size + config.eval_size + config.test_size
    if wanted > len(rows):
        raise UserError(f"train_size + eval_size + test_size = {wanted} but {config.dataset_name} has only "
                        f"{len(rows)} rows: lower the sizes")
    check_system_prompt(config.system_prompt, tokenizer)
    conversations = to_conversations(rows, config.dataset_format, config.system_prompt)
    encoded, excluded, lengths = encode_rows(tokenizer, conversations, config.max_length,
                                             cache_dir=tokenization_cache_dir() if config.tokenization_cache else None)
    reasons = exclusion_counts(excluded)
    if not encoded:
        if set(reasons) == {"over max_length"}:
            raise UserError(f"no row of {config.dataset_name} fits in max_length {config.max_length} "
                            f"(first: {next(iter(excluded.values()))}): raise max_length")
        raise UserError(f"no usable row in {config.dataset_name} ({_counted(reasons)}; first: row "
                        f"{next(iter(excluded))}, {next(iter(excluded.values()))}): fix the rows or --dataset_format")
    if excluded:
        log.info("excluded %d of %d rows: %s (first: row %d, %s)", len(excluded), len(rows), _counted(reasons),
                 *next(iter(excluded.items())))
    split = split_rows(conversations, sorted(encoded), config.train_size, config.eval_size, config.test_size,
                       config.seed)
    generate_rows = stratified_sample(conversations, split["test"], config.num_generate, random.Random(config.seed))
    return Data(rows, encoded, excluded, split, lengths, generate_rows, conversations)


def _counted(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in reasons.items())


def setup_model(config: Config, tokenizer=None):
    """The base model in the compute dtype with LoRA adapters (fp32) on `lora_target_modules`."""
    device = "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"
    model = load_model(config.model_name_or_path, compute_dtype(config), config.attn_implementation,
                       config.trust_remote_code, device=device, load_in_4bit=config.load_in_4bit)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing is True)
    set_seed(config.seed)
    model = wrap_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


@contextlib.contextmanager
def lm_head_positions(labelled_only: bool):
    """Within this block, TRL's fused LM head scores only the labelled positions (`labelled_only`)
    or every position, on every device.

    TRL decides it per call with `trl.trainer.utils._use_triton(device)`: labelled positions only on
    CUDA/XPU with Triton, every position elsewhere (to keep tile shapes fixed for XLA/Neuron). On CPU
    that spends most of a small model's step on prompt and padding positions, whose scores are zeroed
    afterwards: the loss and its gradients are the same either way (tests/test_packing.py)."""
    if not hasattr(trl_utils, "_use_triton"):  # another TRL decides for itself (Trainer warns once)
        yield
        return
    decide = trl_utils._use_triton
    trl_utils._use_triton = lambda device: labelled_only
    try:
        yield
    finally:
        trl_utils._use_triton = decide


class Trainer(SFTTrainer):
    """TRL's SFTTrainer with three changes:

    * the LM head scores the positions `lm_head_labelled_only` says, on every device (`lm_head_positions`);
    * the validation loss it logs is `evaluate_loss`'s token-weighted response loss, the same
      number as before and after training (the stock one averages per-batch means);
    * checkpoints appear only when complete: each is written to a hidden `.tmp-checkpoint-N`
      folder and renamed into place, so a crash mid-save never leaves a `checkpoint-N` that
      resuming would trust."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(trl_utils, "_use_triton"):
            import trl

            log.warning("TRL %s has no trl.trainer.utils._use_triton: lm_head_labelled_only=%s has no effect "
                        "(same loss, maybe slower on CPU)", trl.__version__, self.args.lm_head_labelled_only)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with lm_head_positions(self.args.lm_head_labelled_only):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        start = time.perf_counter()
        loss = evaluate_loss(self.model, dataset.select_columns(["input_ids", "labels"]).to_list(),
                             self.processing_class.pad_token_id, self.args.per_device_eval_batch_size,
                             eos_token_id=self.processing_class.eos_token_id)
        metrics = {f"{metric_key_prefix}_loss": loss["loss"], f"{metric_key_prefix}_perplexity": loss["perplexity"],
                   f"{metric_key_prefix}_eos_logprob": loss["eos_logprob"],
                   f"{metric_key_prefix}_runtime": time.perf_counter() - start}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.model.train()
        return metrics

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, f".tmp-{name}")
        self._get_output_dir = lambda trial=None: staging  # where the parent class writes
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            os.replace(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def trainer_config(config: Config) -> Config:
    """The configuration handed to TRL. With padding-free batches (the default) TRL gets
    `max_length=None`, as it refuses `padding_free` without packing otherwise (rows over `max_length`
    are already dropped by `prepare_data`), and counts every token as real, since none is padding
    (its `non_padding` count would skip the EOS tokens, which equal the pad token)."""
    if config.padding_free and not config.packing and config.max_length is not None:
        config = copy.copy(config)
        config.max_length = None
        config.include_num_input_tokens_seen = "all" if config.pad_to_multiple_of is None else "non_padding"
    return config


def build_trainer(config: Config, model, tokenizer, data: Data) -> SFTTrainer:
    """TRL's SFTTrainer on the pre-tokenized rows: TRL pads labels with -100 (or, padding-free,
    concatenates rows with restarting position ids), so the EOS stays trained. Resolves
    `gradient_checkpointing="auto"` first, from the worst-case micro-batch (`memory.decide_checkpointing`)."""
    decide_checkpointing(config, model, data, tokenizer.pad_token_id)  # "auto" becomes on or off, measured
    eval_dataset = data.dataset("validation") if config.eval_size and config.eval_strategy != "no" else None
    if eval_dataset is None:
        config.eval_strategy = "no"
    return Trainer(model=model, args=trainer_config(config), train_dataset=data.dataset("train"), eval_dataset=eval_dataset,
                      processing_class=tokenizer)


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


def fit(trainer: SFTTrainer) -> dict:
    """Train; return loss, runtime, real (non-padding) tokens per second and, on CUDA, peak memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume = resume_path(trainer.args)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    metrics = {"train_loss": output.training_loss, "train_runtime": runtime, "train_steps": output.global_step,
               "train_tokens": int(trainer.state.num_input_tokens_seen),
               "train_tokens_per_second": trainer.state.num_input_tokens_seen / runtime,
               "world_size": trainer.args.world_size,
               "effective_batch_size": trainer.args.per_device_train_batch_size
               * trainer.args.gradient_accumulation_steps * trainer.args.world_size}
    if torch.cuda.is_available():
        metrics["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        metrics["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return metrics


def train(config: Config) -> dict:
    """The whole run; writes `config.output_dir` and returns its metrics (with `timings`: seconds per stage)."""
    timings = Timings()
    check_output_dir(config)
    check_target_modules(config.model_name_or_path, config.lora_target_modules, config.trust_remote_code)
    check_model_fits(config)
    set_seed(config.seed)
    with timings("prepare_data"):
        tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
        data = prepare_data(config, tokenizer)
        log.info("configuration:\n%s", config.to_json())  # only once known good: bad input shows just its error
        log.info("data: %s", data.stats(config.max_length))
    with timings("load_model"):
        model = setup_model(config, tokenizer)
        trainer = build_trainer(config, model, tokenizer, data)
    with timings("evaluate_base"):
        base = evaluate_base(config, model, tokenizer, data)
    with timings("train"):
        train_metrics = fit(trainer)
    with timings("evaluate_tuned"):
        tuned = evaluate_model(config, model, tokenizer, data)
    with timings("save"):
        metrics = summarize(base, tuned, train_metrics, model, data, config) | {"timings": timings.as_dict()}
        save_run(config, model, tokenizer, metrics, data.split, trainer.state.log_history,
                 generations={"base": base.get("generations", []), "tuned": tuned.get("generations", [])},
                 trainer=trainer)
    if trainer.is_world_process_zero():  # metrics.json gets the final timings, saving included
        metrics["timings"] = write_timings(config.output_dir, timings)
    log.info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    log.info("timings (s): %s", timings.summary())
    return metrics


def summarize(base: dict, tuned: dict, train_metrics: dict, model, data: Data, config: Config) -> dict:
    """One flat metrics dict: fine-tuned values under their names, the base model's under `base_*`."""
    scalars = lambda d: {k: v for k, v in d.items() if k not in ("generations", "per_category")}  # noqa: E731
    metrics = scalars(tuned) | {f"base_{k}": v for k, v in scalars(base).items()} | train_metrics
    metrics["trainable_parameters"], metrics["total_parameters"] = count_parameters(model)
    metrics["rows"] = {part: len(idx) for part, idx in data.split.items()} | {"excluded": len(data.excluded)}
    if "per_category" in tuned:
        metrics["per_category"] = {"base": base["per_category"], "tuned": tuned["per_category"]}
    return metrics
