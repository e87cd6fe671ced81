"""Preference tuning after SFT: DPO (TRL's `DPOTrainer`) that continues a finished run's LoRA adapter.

    python -m tinyllama_ft dpo --adapter runs/tinyllama-dolly [--dataset_name D] [--output_dir OUT] [--beta B]

The reference model is the SFT model itself, with no second model in memory: TRL copies the loaded
SFT adapter into a frozen adapter named ``ref`` beside the trained ``default`` one, and its forward pass
under ``ref`` gives the reference log-probabilities at each step (docs/DPO.md measures this against
`precompute_ref_log_probs`). The stages are functions the notebook calls one by one; `train_dpo`
chains them. The output is a run folder like SFT's, which `generate`, `chat`, `serve` and `export` read.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from ..data.pairs import parse_pair_columns
from ..errors import UserError
from ..settings.console import log_settings
from ..settings.device import check_training_device, device_line, remember_cpu_request
from ..settings.paths import recorded
from ..settings.precision import set_precision
from ..settings.sources import file_layer, merge_layers, parse_flags
from ..settings.tracking import check_trackers
from ..settings.validation import check_optimizer_steps, inherited_post_init, refuse, sources, validate
from ..storage.run_folder import StagedCheckpoints

log = logging.getLogger(__name__)

DEFAULT_PAIRS = "HuggingFaceH4/orca_dpo_pairs"  # MIT licence; splits train_prefs (12.4k) / test_prefs
SAMPLE_PAIRS = str(Path(__file__).parents[1] / "samples" / "sample_pairs.jsonl")

# TRL's DPOConfig: the loss types its help lists and DPOTrainer computes, the f-divergences, and the losses that
# take a non-default f-divergence (tests/test_bad_settings.py reads them back from the installed TRL).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")

DPO_PRESETS: dict[str, dict] = {
    # Continues the SFT smoke run (`train --preset smoke`, runs/smoke) on the bundled pairs, offline, in seconds.
    "smoke": dict(adapter="runs/smoke", dataset_name=SAMPLE_PAIRS, output_dir="runs/smoke-dpo",
                  train_size=24, eval_size=8, num_generate=4, max_new_tokens=16, max_length=256, max_steps=6,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3, logging_steps=1,
                  save_steps=3, gradient_checkpointing=False, precision="fp32"),
}


@dataclass
class DpoConfig(DPOConfig):
    """Every knob of a DPO run. TRL's names where TRL has them; defaults for one 12 GB card, each with its reason."""

    adapter: str | None = field(
        default=None, metadata={"help": "The finished SFT run folder whose adapter DPO continues (required); the SFT "
                                "model is also the reference."})
    # --- data ---
    dataset_name: str = field(
        default=DEFAULT_PAIRS,
        metadata={"help": "Preference pairs: a hub id, a dataset folder or a .json/.jsonl/.parquet file with prompt, "
                  "chosen, rejected (strings or messages; prompt may be implicit). Default: HuggingFaceH4/"
                  "orca_dpo_pairs (MIT): GPT-4 answers chosen over weaker ones on varied instructions, short enough "
                  "for a 1.1B chat model; not UltraFeedback, on which TinyLlama-Chat was already DPO-tuned."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of a hub dataset."})
    dataset_split: str | None = field(
        default=None, metadata={"help": "Split of a hub dataset to read pairs from (train and held-out pairs are both "
                                "drawn from it). Default: train_prefs for the default dataset, else train."})
    columns: dict[str, str] | str | None = field(
        default=None, metadata={"help": "Rename columns to ours: prompt=question,chosen=better,rejected=worse "
                                "(names: prompt, chosen, rejected, system, category)."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message for pairs without one. Default: the SFT run's own, so the "
                                "prompt stays the one the model is used with."})
    train_size: int = field(default=2000, metadata={"help": "Training pairs: 125 steps of 16, about an hour on a 12 GB "
                                                    "card; enough to move a LoRA adapter, not to forget SFT.",
                                                    "check": "> 0"})
    eval_size: int = field(default=200, metadata={"help": "Held-out pairs scored before and after DPO.",
                                                  "check": ">= 0"})
    alignment_eval: bool = field(
        default=True, metadata={"help": "Also measure what alignment cost on the SFT run's own validation rows (response "
                                "loss, EOS log-prob) and generations (EOS rate), before and after."})
    num_generate: int = field(default=100, metadata={"help": "SFT test rows generated before and after for the EOS "
                                                     "rate (at most the SFT run's own); 0 skips generation.",
                                                     "check": ">= 0"})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per response (EOS rate).",
                                                       "check": "> 0"})
    precision: str = field(
        default="auto", metadata={"help": "auto | bf16 | fp16 | fp32, as for train: bf16 where supported (2.2 GB of "
                                  "frozen weights for 1.1B), fp32 on CPU.",
                                  "choices": ["auto", "bf16", "fp16", "fp32"]})
    preset: str | None = field(default=None, metadata={"help": f"Named overrides: {', '.join(DPO_PRESETS)}."})
    # --- training: where the defaults differ from DPOConfig's ---
    output_dir: str = field(default="runs/tinyllama-dolly-dpo", metadata={"help": "Where the DPO run is written."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: how far from the SFT reference the policy may "
                                               "move (TRL's and the DPO paper's default).", "check": "> 0"})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"DPO loss, or several combined by loss_weights: {', '.join(DPO_LOSS_TYPES)} (TRL's "
                  "DPOConfig). sigmoid: the DPO paper's.", "choices": list(DPO_LOSS_TYPES), "check": "nonempty"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Robust DPO's probability that a preference label is flipped, in [0, 0.5) "
                               "(TRL's documented range; the paper suggests 0.1); EXO's epsilon (needs > 0, e.g. "
                               "1e-3). Ignored by the other losses.", "check": "[0, 0.5)"})
    f_divergence_type: str = field(
        default="reverse_kl", metadata={"help": "f-divergence between policy and reference (f-DPO): "
                                        f"{', '.join(F_DIVERGENCES)}.", "choices": list(F_DIVERGENCES)})
    learning_rate: float = field(default=5e-5, metadata={"help": "A quarter of SFT's 2e-4: a LoRA adapter needs more than "
                                                         "full-weight DPO's 5e-7, and the policy should drift slowly.",
                                                         "check": "> 0"})
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Pairs per micro-batch: one pair is two sequences (chosen, rejected) of up to "
                             "max_length, the same tokens as SFT's 2 rows, which fit 12 GB.", "check": "> 0"})
    per_device_eval_batch_size: int = field(default=2, metadata={"help": "Pairs per evaluation batch (no gradients).",
                                                                 "check": "> 0"})
    gradient_accumulation_steps: int = field(default=16, metadata={"help": "Micro-batches per step: 16 pairs a step, "
                                                                 "SFT's 16 rows.", "check": "> 0"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (one: DPO overfits "
                                                           "fast).", "check": ">= 0"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (as SFT)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up: a tenth of the steps (DPO recipes use 0.1).",
                                                       "check": ">= 0"})
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest prompt + response in tokens (SFT's); longer pairs are dropped and "
                                "counted, never truncated.", "check": ">= 16"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations (as SFT, for 12 GB)."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Score the reference once before training instead of at each step. Off: with "
                                 "a LoRA policy the reference is an adapter copy, not a model, so it saves no memory, "
                                 "and the frozen adapter keeps resume and evaluation simple (docs/DPO.md measures both)."})
    logging_steps: float = field(default=10, metadata={"help": "Log loss, rewards and margins every N steps.",
                                                       "check": "> 0"})
    save_steps: float = field(default=0.1, metadata={"help": "Checkpoint every N steps or fraction (<1) of them: a stop "
                                                     "loses at most a tenth.", "check": "> 0"})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints.",
                                                              "check": ">= 0"})
    eval_strategy: str = field(default="no", metadata={"help": "The held-out pairs are scored before and after; TRL's "
                                                       "periodic evaluation is off."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "Optimizer (as SFT)."})
    seed: int = field(default=42, metadata={"help": "Seed for the split and the data order.",
                                            "check": "[0, 4294967295]"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a finished run in output_dir."})
    include_num_input_tokens_seen: str = field(default="non_padding", metadata={"help": "Count real tokens."})
    # --- recorded, not set: what the run started from ---
    stage: str = field(default="dpo", metadata={"help": "Recorded in run_config.json: this run is a DPO stage."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Recorded: the base model, read from the SFT adapter (not a setting)."})
    sft_run_config: dict | str | None = field(
        default=None, metadata={"help": "Recorded: the SFT run's run_config.json (not a setting)."})

    def __post_init__(self):
        validate(self)  # every field's declared type and range, as for train's Config
        self._check_values()
        remember_cpu_request(self)  # before set_precision may set use_cpu itself
        set_precision(self, self.precision)
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
        inherited_post_init(super().__post_init__, "dpo")

    def _check_values(self):
        """Consistency between fields (each field alone is checked by `validate`)."""
        if not self.adapter:
            raise UserError("dpo needs --adapter RUN: the folder of a finished SFT run (python -m tinyllama_ft train)")
        check_trackers(self.report_to)
        self.columns = parse_pair_columns(self.columns) or None
        self.system_prompt = (self.system_prompt or "").strip() or None
        self.dataset_split = self.dataset_split or ("train_prefs" if self.dataset_name == DEFAULT_PAIRS else "train")
        if self.max_steps == 0 or self.max_steps < -1:
            raise refuse("max_steps", self.max_steps, "max_steps must be > 0, or -1 to train num_train_epochs", 100)
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise refuse("num_train_epochs", self.num_train_epochs,
                         f"num_train_epochs must be > 0, got {self.num_train_epochs} (or set max_steps)", 1)
        check_optimizer_steps(self, "pairs")
        self._check_loss()
        if self.overwrite_output_dir and str(self.resume_from_checkpoint).lower() not in ("none", "false", "no", "0", ""):
            raise UserError("--overwrite_output_dir true and --resume_from_checkpoint contradict each other: pass "
                            "one of them (overwrite starts over, resume continues)")
        if Path(self.output_dir).resolve() == Path(self.adapter).resolve():
            raise UserError(f"--output_dir {self.output_dir} is the SFT run itself: pass another folder (the SFT run "
                            "stays as it is, DPO writes a new run)")

    def _check_loss(self):
        """What TRL's DPOTrainer would refuse only after the model has loaded."""
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise refuse("label_smoothing", 0.0, "the exo_pair loss needs label_smoothing > 0 (the EXO paper "
                         "suggests 1e-3)", 0.001)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} loss_type "
                            "values: give one weight a loss")
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_type) <= set(F_DIVERGENCE_LOSSES):
            raise refuse("f_divergence_type", self.f_divergence_type, "applies only to the losses "
                         f"{', '.join(F_DIVERGENCE_LOSSES)}", "reverse_kl")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_type):
            raise UserError("use_weighting does not apply to the aot and aot_unpaired losses (they sort the pairs): "
                            "drop --use_weighting or choose another loss_type")

    def to_json(self) -> str:
        data = self.to_dict()
        data.pop("hub_token", None)
        return json.dumps(data, indent=2, sort_keys=True, default=str)


def parse_dpo_config(args: list[str] | None = None, **overrides) -> DpoConfig:
    """defaults < preset < YAML (`--config F.yaml`) < flags < keyword overrides, as `parse_config`: every value
    checked by the same declared rules, before anything is loaded or written."""
    path, from_file, args = file_layer(list(args or []))
    layers = [(f"file {path}", from_file), ("flag", parse_flags(DpoConfig, args, "dpo")), ("keyword", overrides)]
    merged, origin = merge_layers(DpoConfig, DPO_PRESETS, layers, "dpo")
    with sources(origin):
        return DpoConfig(**merged)


# --- stages ---------------------------------------------------------------------------------------

def check_sft_run(folder: str) -> dict:
    """The SFT run's `run_config.json`, after checking that `folder` is a finished SFT run folder:
    one line naming the problem otherwise (a file, a merged export, a checkpoint, a DPO run, ...)."""
    from ..model.loading import is_model_folder
    from ..storage.saved_model import check_saved_folder

    path = Path(folder)
    if path.is_dir() and not (path / "adapter_config.json").is_file():
        what = "a merged export (a full model)" if is_model_folder(path) else "not a run folder (no adapter_config.json)"
        raise UserError(f"--adapter {folder} is {what}: pass the SFT run folder (the output_dir of `train`)"
                        + (" it was exported from" if is_model_folder(path) else ""))
    check_saved_folder(path)
    if (path / "trainer_state.json").is_file():
        raise UserError(f"{folder} is a checkpoint of a run, not a finished run: pass the run folder that holds it "
                        "(finish it with --resume_from_checkpoint true)")
    if not (path / "run_config.json").is_file() or not (path / "metrics.json").is_file():
        raise UserError(f"{folder} is not a finished tinyllama-ft run (no run_config.json or metrics.json): pass the "
                        "output folder of `python -m tinyllama_ft train`")
    try:
        run_config = json.loads((path / "run_config.json").read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path / 'run_config.json'} is not valid JSON ({error}): restore it from the run") from None
    if run_config.get("stage") == "dpo":
        raise UserError(f"{folder} is a DPO run, not an SFT run: pass the SFT run it started from "
                        f"({run_config.get('adapter')})")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{folder} has no adapter_model.safetensors: pass a finished run folder")
    return run_config


def resolve_from_sft(config: DpoConfig, sft_run_config: dict) -> DpoConfig:
    """Fill in what the DPO run takes from its SFT run: the base model, the system prompt, and the record."""
    config.model_name_or_path = PeftConfig.from_pretrained(config.adapter).base_model_name_or_path
    if config.system_prompt is None:
        config.system_prompt = sft_run_config.get("system_prompt") or None
    config.sft_run_config = sft_run_config
    return config


def load_policy(config: DpoConfig):
    """The base model in the compute dtype with the SFT adapter loaded trainable (fp32 LoRA weights)."""
    from ..settings.precision import compute_dtype
    from ..model.loading import count_parameters, load_model

    device = "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"
    model = load_model(config.model_name_or_path, compute_dtype(config), device=device,
                       trust_remote_code=config.trust_remote_code)
    model = PeftModel.from_pretrained(model, config.adapter, is_trainable=True)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.3f%%), continued from %s", f"{trainable:,}", f"{total:,}",
             100 * trainable / total, config.adapter)
    return model


class DpoTrainer(StagedCheckpoints, DPOTrainer):
    """TRL's DPOTrainer with three changes:

    * it takes rows already encoded by `data/pairs.py`'s `encode_pair` (`prompt_ids`, `chosen_ids`,
      `rejected_ids`) as they are: TRL 1.16 would re-tokenize them from text;
    * the frozen `ref` adapter is not written into checkpoints or the run folder (it is the SFT adapter,
      which the SFT run folder already holds; a resumed run copies it again from there);
    * checkpoints appear only when complete (written to `.tmp-checkpoint-N`, then renamed), with what defines the
      run (`fingerprint.DPO_DEFINING`, compared on resume) and its settings, as SFT's (`StagedCheckpoints`)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        shutil.rmtree(Path(output_dir or self.args.output_dir) / "ref", ignore_errors=True)

    def create_model_card(self, *args, **kwargs):  # the run folder gets tinyllama-ft's card (dpo_card.py)
        return None


def build_dpo_trainer(config: DpoConfig, model, tokenizer, pairs, folder=None) -> DpoTrainer:
    """TRL's DPOTrainer on the encoded training pairs; the `ref` adapter is made here (a copy of the SFT one).
    `folder`: where it writes when not `output_dir` (a run replacing another is written beside it)."""
    set_seed(config.seed)
    args = config
    if folder is not None and str(folder) != config.output_dir:
        args = copy.copy(config)
        args.output_dir = str(folder)
    return DpoTrainer(model=model, args=args, train_dataset=pairs.dataset("train"), processing_class=tokenizer)


def train_dpo(config: DpoConfig) -> dict:
    """The whole DPO stage; writes `config.output_dir` (holding its lock) and returns its metrics."""
    from ..storage.run_folder import output_dir_held

    with output_dir_held(config, "dpo"):  # one command at a time in output_dir
        return _train_dpo(config)


def _train_dpo(config: DpoConfig) -> dict:
    from ..storage.fingerprint import DPO_DEFINING, PAIR_KEYS, check_resume, file_hash, fingerprint
    from ..storage.run_folder import (check_output_dir, finish_run, meet_when_saved, resume_path, save_run,
                                      training_folder)
    from ..model.loading import load_tokenizer, model_parameters
    from ..data.pairs import prepare_pairs
    from ..evaluation.preferences import evaluate_stage, load_sft_validation, summarize_dpo
    from ..storage.timings import Timings, write_timings
    from .sft import fit

    timings = Timings()
    sft_run_config = check_sft_run(config.adapter)
    check_output_dir(config)
    resolve_from_sft(config, sft_run_config)
    check_training_device(config, config.model_name_or_path,
                          model_parameters(config.model_name_or_path, config.trust_remote_code))
    folder = training_folder(config)  # output_dir, or beside the run it replaces (untouched until this one is complete)
    set_seed(config.seed)
    with timings("prepare_data"):
        tokenizer = load_tokenizer(config.adapter)
        pairs = prepare_pairs(config, tokenizer)
        defining = fingerprint(config, pairs.examples("train"), DPO_DEFINING, PAIR_KEYS,
                               sft_adapter=file_hash(Path(config.adapter) / "adapter_model.safetensors"))
        if resume_path(config):  # before the model loads: the checkpoint must continue this very run
            check_resume(resume_path(config), defining)
        sft_data = load_sft_validation(config, sft_run_config, tokenizer) if config.alignment_eval else None
        log_settings(log, config, parse_dpo_config(["--adapter", config.adapter]), skip=("sft_run_config",))
        log.info("pairs: %s", pairs.stats())
    with timings("load_model"):
        log.info("%s", device_line(config))  # after the checks: bad input shows only its error
        model = load_policy(config)
        trainer = build_dpo_trainer(config, model, tokenizer, pairs, folder)
        trainer.fingerprint, trainer.run_config = defining, recorded(json.loads(config.to_json()))  # each checkpoint
    with timings("evaluate_before"):
        before = evaluate_stage(config, model, tokenizer, pairs, sft_data)
    with timings("train"):
        train_metrics = fit(trainer)
    with timings("evaluate_after"):
        after = evaluate_stage(config, model, tokenizer, pairs, sft_data)
    with timings("save"):
        metrics = summarize_dpo(before, after, train_metrics, model, pairs) | {"timings": timings.as_dict()}
        save_run(config, model, tokenizer, metrics, pairs.split, trainer.state.log_history,
                 generations={"sft": before.get("generations", []), "dpo": after.get("generations", [])},
                 trainer=trainer, folder=folder)  # the card describes both stages (dpo_card.py)
    if trainer.is_world_process_zero():
        metrics["timings"] = write_timings(folder, timings)
        finish_run(config, folder)
    meet_when_saved(trainer)
    log.info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    log.info("the run is in %s (its model card: README.md there)", config.output_dir)
    return metrics
