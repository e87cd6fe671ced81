"""The run, stage by stage: check -> data -> model -> base evaluation -> training -> evaluation -> save.

`STAGES` lists them in order and `Run` has one method per stage: `train(config)` calls them all for the
command line, the notebook one a cell. The data stage is `data.prepare_data`, the evaluations are
`evaluation/dolly.py`'s, the run folder `storage/run_folder.py`'s; here are the model's setup and the trainer.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from trl import SFTTrainer

from ..data.formats import check_local_file
from ..data.prepare import Data, prepare_data, tokenization_cache_dir
from ..evaluation.dolly import evaluate_base, evaluate_loss, evaluate_model, summarize
from ..model.loading import check_model_shape, count_parameters, load_model, load_tokenizer, wrap_lora
from ..settings.config import Config, build_config
from ..settings.console import log_settings
from ..settings.device import check_training_device, device_line
from ..settings.memory import decide_checkpointing
from ..settings.paths import recorded
from ..settings.precision import compute_dtype
from ..storage.fingerprint import apply_new_cadence, check_resume, fingerprint
from ..storage.run_folder import (StagedCheckpoints, check_output_dir, finish_run, meet_when_saved, output_dir_held,
                                  resume_path, save_run, training_folder)
from ..storage.lock import remove_dead_temp_files
from ..storage.timings import Timings, write_timings
from .lm_head import has_switches, lm_head_scoring

log = logging.getLogger(__name__)


def setup_model(config: Config, tokenizer=None):
    """The base model in the compute dtype with LoRA adapters (fp32) on `lora_target_modules`."""
    device = "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"
    model = load_model(config.model_name_or_path, compute_dtype(config), config.attn_implementation,
                       config.trust_remote_code, device=device, load_in_4bit=config.load_in_4bit)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing is True)
    set_seed(config.seed)
    model = wrap_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                      config.use_dora, config.use_rslora)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


class Trainer(StagedCheckpoints, SFTTrainer):
    """TRL's SFTTrainer with three changes:

    * the LM head scores the positions `lm_head_labelled_only` says, on every device, the way
      `lm_head_implementation` says (`lm_head.lm_head_scoring`);
    * the validation loss it logs is `evaluate_loss`'s token-weighted response loss, the same
      number as before and after training (the stock one averages per-batch means);
    * checkpoints appear only when complete: each is written to a hidden `.tmp-checkpoint-N`
      folder and renamed into place, so a crash mid-save never leaves a `checkpoint-N` that
      resuming would trust."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not has_switches():
            import trl

            log.warning("TRL %s has no trl.trainer.utils._use_triton or _ChunkedLogProbFunction: "
                        "lm_head_labelled_only=%s and lm_head_implementation=%s have no effect (same loss, maybe "
                        "slower on CPU)", trl.__version__, self.args.lm_head_labelled_only,
                        self.args.lm_head_implementation)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with lm_head_scoring(self.args.lm_head_labelled_only, self.args.lm_head_implementation):
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


def trainer_config(config: Config, folder: str | Path | None = None) -> Config:
    """The configuration handed to TRL. With padding-free batches (the default) TRL gets
    `max_length=None`, as it refuses `padding_free` without packing otherwise (rows over `max_length`
    are already dropped by `prepare_data`), and counts every token as real, since none is padding
    (its `non_padding` count would skip the EOS tokens, which equal the pad token)."""
    if folder is not None and str(folder) != config.output_dir:  # a run replacing another is written beside it
        config = copy.copy(config)
        config.output_dir = str(folder)
    if config.padding_free and not config.packing and config.max_length is not None:
        config = copy.copy(config)
        config.max_length = None
        config.include_num_input_tokens_seen = "all" if config.pad_to_multiple_of is None else "non_padding"
    return config


def build_trainer(config: Config, model, tokenizer, data: Data, folder: str | Path | None = None) -> SFTTrainer:
    """TRL's SFTTrainer on the pre-tokenized rows: TRL pads labels with -100 (or, padding-free,
    concatenates rows with restarting position ids), so the EOS stays trained. Resolves
    `gradient_checkpointing="auto"` first, from the worst-case micro-batch (`memory.decide_checkpointing`)."""
    decision = decide_checkpointing(config, model, data, tokenizer.pad_token_id)  # "auto" becomes on or off
    eval_dataset = data.dataset("validation") if config.eval_size and config.eval_strategy != "no" else None
    if eval_dataset is None:
        config.eval_strategy = "no"
    trainer = Trainer(model=model, args=trainer_config(config, folder), train_dataset=data.dataset("train"),
                      eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=[NewCadence()])
    trainer.fingerprint = fingerprint(config, data.examples("train"))  # written into each checkpoint
    trainer.checkpointing_decision = decision  # into the run's metrics, beside the peak memory it led to
    trainer.run_config = recorded(json.loads(config.to_json()))  # paths as run_config.json records them
    return trainer


class NewCadence(TrainerCallback):
    """A resumed run logs, evaluates and saves at this command's steps (`fingerprint.apply_new_cadence`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        apply_new_cadence(state, args)


class _NothingLeft(Exception):
    """Leaves `Trainer.train` once a checkpoint of the run's last step is loaded (`StopAtTheLastStep`)."""


class StopAtTheLastStep(TrainerCallback):
    """transformers resumed from a run's last checkpoint still trains one more step (its loop looks at `max_steps`
    only after a step): a 9th step of an 8-step run, with a constant learning rate another adapter than the
    uninterrupted run's (tests/test_reliability.py). Once the checkpoint is loaded, nothing is trained."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            raise _NothingLeft


def fit(trainer: SFTTrainer) -> dict:
    """Train, or go on from `resume_from_checkpoint`; return the loss, runtime and real (non-padding) tokens per
    second of the steps this call trained (`train_steps_run` of the run's `train_steps`; a resumed run's
    `train_loss` is the mean over its own steps, None where the checkpoint was the run's last step) and, on CUDA,
    peak memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume = resume_path(trainer.args)
    before = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8")) if resume else {}
    start = time.perf_counter()
    trainer.add_callback(StopAtTheLastStep)
    try:
        loss = trainer.train(resume_from_checkpoint=resume).training_loss
    except _NothingLeft:
        loss = None
        log.info("%s is the run's last step (%d): nothing is left to train, its adapter goes on", resume,
                 trainer.state.global_step)
    finally:
        trainer.remove_callback(StopAtTheLastStep)
    runtime = time.perf_counter() - start
    ran = trainer.state.global_step - before.get("global_step", 0)
    tokens = trainer.state.num_input_tokens_seen - before.get("num_input_tokens_seen", 0)
    metrics = {"train_loss": loss if ran else None, "train_runtime": runtime, "train_steps": trainer.state.global_step,
               "train_steps_run": ran, "train_tokens": int(trainer.state.num_input_tokens_seen),
               "train_tokens_per_second": tokens / runtime if ran else None,
               "world_size": trainer.args.world_size,
               "effective_batch_size": trainer.args.per_device_train_batch_size
               * trainer.args.gradient_accumulation_steps * trainer.args.world_size}
    if torch.cuda.is_available():
        metrics["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        metrics["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if getattr(trainer, "checkpointing_decision", None):
        metrics["gradient_checkpointing_decision"] = trainer.checkpointing_decision
    return metrics


# --- the run, stage by stage --------------------------------------------------------------------

# The stages of a run, in order: `train(config)` calls each `Run` method named here, and so does the
# notebook, one a cell (tests/test_notebook.py checks both the order and that the adapters are the same).
STAGES = ("check", "prepare_data", "load_model", "evaluate_base", "train", "evaluate_tuned", "save")


class Run:
    """One run of `config`, stage by stage (`STAGES`); each stage keeps what it makes on the run:
    `tokenizer` and `data`, `model` and `trainer`, `base`, `train_metrics`, `tuned` and `metrics`.
    `timings` holds the seconds per stage, counted from the run's creation."""

    def __init__(self, config: Config):
        self.config, self.timings = config, Timings()

    def check(self) -> None:
        """Before anything loads: the output folder, the settings against the model's shape, a model too big for
        the CPU where no GPU is visible (`settings.device`); then the seed."""
        check_output_dir(self.config)
        check_local_file(self.config.dataset_name)  # a missing file is said before the model is looked for
        parameters = check_model_shape(self.config)
        check_training_device(self.config, self.config.model_name_or_path, parameters)
        set_seed(self.config.seed)
        # Where it writes: output_dir, or beside the run it replaces (untouched until this one is complete)
        self.folder = training_folder(self.config)

    def prepare_data(self) -> Data:
        """The tokenizer, and the rows validated, encoded, filtered and split (`data.prepare_data`)."""
        with self.timings("prepare_data"):
            self.tokenizer = load_tokenizer(self.config.model_name_or_path, self.config.trust_remote_code)
            remove_dead_temp_files(tokenization_cache_dir())  # what a killed tokenization left
            self.data = prepare_data(self.config, self.tokenizer)
            if resume_path(self.config):  # before the model loads: the checkpoint must continue this very run
                check_resume(resume_path(self.config), fingerprint(self.config, self.data.examples("train")))
            log_settings(log, self.config, build_config([]))  # once known good: bad input shows only its error
            log.info("data: %s", self.data.stats(self.config.max_length))
        return self.data

    def load_model(self):
        """The base model with LoRA adapters (`setup_model`) and its trainer (`build_trainer`)."""
        with self.timings("load_model"):
            log.info("%s", device_line(self.config))  # after the checks: bad input shows only its error
            self.model = setup_model(self.config, self.tokenizer)
            self.trainer = build_trainer(self.config, self.model, self.tokenizer, self.data, self.folder)
        return self.model

    def evaluate_base(self) -> dict:
        """The base model (adapters off) on the held-out rows."""
        with self.timings("evaluate_base"):
            self.base = evaluate_base(self.config, self.model, self.tokenizer, self.data)
        return self.base

    def train(self) -> dict:
        """Fine-tune (`fit`): loss, runtime, real tokens per second."""
        with self.timings("train"):
            self.train_metrics = fit(self.trainer)
        return self.train_metrics

    def evaluate_tuned(self) -> dict:
        """The fine-tuned model on the same rows, and the run's metrics (`summarize`: base and tuned side by side)."""
        with self.timings("evaluate_tuned"):
            self.tuned = evaluate_model(self.config, self.model, self.tokenizer, self.data)
            self.metrics = summarize(self.base, self.tuned, self.train_metrics, self.model, self.data, self.config)
        return self.tuned

    def save(self) -> dict:
        """Everything into `output_dir` (`save_run`), `metrics.json` last, with the seconds per stage."""
        with self.timings("save"):
            self.metrics["timings"] = self.timings.as_dict()
            save_run(self.config, self.model, self.tokenizer, self.metrics, self.data.split,
                     self.trainer.state.log_history, trainer=self.trainer, folder=self.folder,
                     generations={"base": self.base.get("generations", []), "tuned": self.tuned.get("generations", [])})
        if self.trainer.is_world_process_zero():  # metrics.json gets the final timings, saving included
            self.metrics["timings"] = write_timings(self.folder, self.timings)
            finish_run(self.config, self.folder)  # a run it replaces goes only now, the new one complete
        meet_when_saved(self.trainer)
        log.info("metrics: %s", {k: v for k, v in self.metrics.items() if not isinstance(v, (dict, list))})
        log.info("timings (s): %s", self.timings.summary())
        log.info("the run is in %s (its model card: README.md there)", self.config.output_dir)
        return self.metrics


def train(config: Config) -> dict:
    """The whole run, every stage of `STAGES`; writes `config.output_dir` and returns its metrics (with
    `timings`: seconds per stage)."""
    run = Run(config)
    with output_dir_held(config, "train"):  # one command at a time in output_dir
        for stage in STAGES:
            getattr(run, stage)()
    return run.metrics
