"""One configuration: TRL's `SFTConfig` plus the model, LoRA and data fields of this project.

Its defaults reproduce the seed run (5,000 Dolly rows, LoRA r=16 on q/k/v/o, batch 2 x 8, lr 2e-4,
one epoch, cosine with 3% warm-up). A preset (``smoke``) is a set of overrides, never other code.
The same field names work in the notebook, on the command line (``--name value``) and in YAML
(``--config F.yaml``), and as ``TINYLLAMA_FT_*`` variables; every value is checked by the rules declared
beside its field (`validation`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig

from ..errors import UserError
from .columns import parse_columns
from .device import remember_cpu_request
from .memory import checkpointing_value
from .precision import require_cuda_and, set_precision
from .sources import file_layer, merge_layers, parse_flags
from .tracking import check_trackers
from .validation import check_optimizer_steps, inherited_post_init, refuse, sources, validate

TINY_RANDOM_LLAMA = "tiny-random-llama"
RESUME_NEWEST = ("true", "yes", "1")  # --resume_from_checkpoint values that mean "the newest checkpoint"
RESUME_OFF = ("false", "no", "0", "", "none")  # ... and those that mean "start from the beginning"
SAMPLE_DATA = str(Path(__file__).parents[1] / "samples" / "sample.jsonl")

PRESETS: dict[str, dict] = {
    # The whole pipeline offline on CPU in well under a minute: a tiny random Llama built in
    # code, the Dolly-format sample shipped with the package, a handful of steps.
    "smoke": dict(
        model_name_or_path=TINY_RANDOM_LLAMA,
        dataset_name=SAMPLE_DATA,
        output_dir="runs/smoke",
        train_size=24,
        eval_size=8,
        test_size=8,
        num_generate=8,
        max_new_tokens=16,
        max_length=256,
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        eval_steps=3,
        save_steps=3,
        gradient_checkpointing=False,
        precision="fp32",
    ),
}


@dataclass
class Config(SFTConfig):
    """Every knob of a run. TRL/transformers fields keep their names; new ones are documented here."""

    # --- model ---
    model_name_or_path: str = field(
        default="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        metadata={"help": "Base model: a hub id or a local folder. `tiny-random-llama` builds a tiny random "
                  "Llama offline (smoke tests)."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel; default: `flash_attention_2` when installed on CUDA, else `sdpa`."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto | bf16 | fp16 | fp32. auto: bf16 where the GPU supports it, else fp16 on CUDA, "
                  "fp32 on CPU. Frozen base weights are held in this dtype; LoRA weights stay in fp32. bf16 also "
                  "runs on CPU when asked for (autocast; half the base's memory, slower on most CPUs); fp16 needs "
                  "CUDA (its loss scaler).",
                  "choices": ["auto", "bf16", "fp16", "fp32"]},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes, double quantisation, "
                  "compute in `precision`), for 6-8 GB cards. CUDA only."},
    )
    # --- LoRA ---
    lora_r: int = field(default=16, metadata={"help": "LoRA rank.", "check": "> 0"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r).", "check": "> 0"})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input.", "check": "[0, 1)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get LoRA adapters (Linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                  "down_proj), or all-linear for every Linear layer but the LM head.", "check": "nonempty"},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA (PEFT's use_dora): each adapted weight learns its "
                           "magnitude apart from its direction; slower steps. It merges and exports like LoRA; vLLM "
                           "and llama.cpp's LoRA refuse it (use the merged export)."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA (PEFT's use_rslora): scale the update by "
                             "lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r, so high ranks keep learning."})
    # --- data ---
    dataset_name: str = field(
        default="databricks/databricks-dolly-15k",
        metadata={"help": "A hub dataset id, a local dataset folder, or a local .json/.jsonl/.parquet file in one "
                  "of the formats of dataset_format."},
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "auto | dolly | alpaca | messages | prompt_completion. auto: detected from the columns: "
                  "dolly (instruction, optional context, response), alpaca (instruction, optional input, output), "
                  "messages (a list of {role, content}, every assistant turn trained) or prompt_completion (prompt, "
                  "completion: strings or message lists, the completion trained). Category optional in all.",
                  "choices": ["auto", "dolly", "alpaca", "messages", "prompt_completion"]},
    )
    columns: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "Rename the dataset's columns to ours: instruction=question,response=answer (in YAML "
                  "also a mapping). Names: instruction, context, response, input, output, category, messages, "
                  "prompt, completion."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of a hub dataset or dataset folder."})
    dataset_split: str = field(
        default="train", metadata={"help": "Split of a hub dataset or dataset folder to read (e.g. train, "
                                   "train[:2000]); the train/validation/test split is then drawn from it."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message put first in every conversation that has none, identically at training, "
                  "evaluation, generate and chat; saved in run_config.json. Default: none."},
    )
    train_size: int = field(default=5000, metadata={"help": "Training rows, drawn after the held-out splits.",
                                                      "check": "> 0"})
    eval_size: int = field(default=500, metadata={"help": "Validation rows (loss and perplexity), held out first.",
                                                     "check": ">= 0"})
    test_size: int = field(default=500, metadata={"help": "Test rows (generation metrics), held out first.",
                                                     "check": ">= 0"})
    num_generate: int = field(default=200, metadata={"help": "Test rows to generate from for ROUGE/BLEU/EOS rate.",
                                                         "check": ">= 0"})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per response.",
                                                           "check": "> 0"})
    harness_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Notebook only: lm-eval tasks of its section 'What did it forget?' (base vs fine-tuned "
                  "through lm-evaluation-harness, on the saved run), e.g. hellaswag arc_easy; empty: skipped, except "
                  "smoke runs, which run the bundled offline task dolly_mc. `train` does not run them; from a shell: "
                  "`python -m tinyllama_ft evaluate --adapter RUN --tasks ...`."},
    )
    tokenization_cache: bool = field(
        default=True,
        metadata={"help": "Keep the tokenized rows in the datasets cache (HF_DATASETS_CACHE/tinyllama_ft), keyed by "
                  "the rows, the tokenizer and the encoding code, so later runs on the same data skip tokenizing."},
    )
    preset: str | None = field(
        default=None,
        metadata={"help": f"Named set of overrides applied before YAML and flags: {', '.join(PRESETS)}."},
    )
    # --- training, seed values where they differ from SFTConfig's defaults ---
    output_dir: str = field(default="runs/tinyllama-dolly", metadata={"help": "Where the run is written."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW).",
                                                                "check": "> 0"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training rows.",
                                                                   "check": ">= 0"})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Rows per device per micro-batch.",
                                                                               "check": "> 0"})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Rows per device per eval batch.",
                                                                              "check": "> 0"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Micro-batches per optimizer step.",
                                                                               "check": "> 0"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up: steps, or a fraction (<1) of all steps.",
                                                                    "check": ">= 0"})
    padding_free: bool = field(
        default=True,
        metadata={"help": "Concatenate each micro-batch's rows into one sequence with restarting position ids "
                  "instead of padding them (same rows, same loss, no compute on padding; ~29 percent of the seed's "
                  "computed tokens were padding). Rows never attend to each other."},
    )
    lm_head_labelled_only: bool = field(
        default=True,
        metadata={"help": "Project through the LM head (32,000 logits a token) only the positions whose next token "
                  "is trained (the response and its EOS, 43 percent of Dolly's tokens), on every device; the others "
                  "add nothing to the loss or its gradients. TRL does so only on CUDA/XPU with Triton. False "
                  "scores every position, like the seed."},
    )
    lm_head_implementation: str = field(
        default="auto",
        metadata={"help": "auto | trl: how the LM head scores its positions in training. auto (default): TRL's "
                  "tiled kernel where Triton runs (CUDA, XPU); elsewhere (CPU, MPS) one matrix product and torch's "
                  "log_softmax, with the same loss and gradients, 1.5x (labelled positions) to 2.1x (every "
                  "position) the speed of TRL's torch fallback on the CPU bench (tinyllama_ft/training/lm_head.py). "
                  "trl: TRL's tiles on every device.",
                  "choices": ["auto", "trl"]},
    )
    optim: str = field(default="adamw_torch_fused", metadata={"help": "Optimizer (fused AdamW by default)."})
    gradient_checkpointing: str = field(
        default="auto",
        metadata={"help": "auto | true | false: recompute activations in the backward pass to save memory. auto "
                  "(default): off when the activations of the worst-case micro-batch (the "
                  "per_device_train_batch_size longest rows), measured before training, take at most half of the "
                  "device's free memory, else on (tinyllama_ft/settings/memory.py; the run records what it chose). "
                  "true: the seed's.", "nargs": "?", "const": "true"},
    )
    logging_steps: float = field(default=50, metadata={"help": "Log the training loss every N steps.",
                                                                     "check": "> 0"})
    save_steps: float = field(
        default=0.1,
        metadata={"help": "Write a checkpoint every N steps, or every fraction (<1) of all steps: 0.1, a tenth, so an "
                  "interruption loses at most a tenth of the run (the real run: every 32 of its 313 steps; the seed "
                  "wrote one every 500, i.e. never: --save_steps 500 restores that). One checkpoint of the real run "
                  "is about 58 MB: LoRA weights 18.0 MB and AdamW's two moments 36.2 MB (fp32), tokenizer 3.6 MB.",
                  "check": "> 0"},
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Keep only the newest N checkpoints: about 116 MB for the real run (a third one for a moment "
                  "while the newest is written). 0 or none keeps them all.", "check": ">= 0"},
    )
    eval_strategy: str = field(default="steps", metadata={"help": "When to compute the validation loss."})
    eval_steps: float | None = field(default=100, metadata={"help": "Validation loss every N steps.",
                                                                        "check": "> 0"})
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest formatted row in tokens; longer rows are dropped and counted.",
                                "check": ">= 16"}
    )
    seed: int = field(default=42, metadata={"help": "Seed for the split, LoRA init and data order.",
                                                         "check": "[0, 4294967295]"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a finished run in output_dir instead of refusing to."})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count real (non-padding) tokens for tokens/second."})

    def __post_init__(self):
        if isinstance(self.gradient_checkpointing, bool):  # presets and Python callers say True/False: auto|true|false
            self.gradient_checkpointing = str(self.gradient_checkpointing).lower()
        validate(self)  # every field's declared type and range, whatever source it came from
        self._check_values()
        remember_cpu_request(self)  # before the lines below set use_cpu themselves
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True  # torchrun/accelerate on a CPU-only machine: one data-parallel run over gloo
        set_precision(self, self._precision_asked())
        # `gradient_checkpointing` is the name the seed and TRL users know; transformers 5 calls it
        # `activation_checkpointing` and reads the old name only when the new one is unset.
        self.gradient_checkpointing = checkpointing_value(self.gradient_checkpointing)
        if self.activation_checkpointing is None:  # "auto" stays until build_trainer has measured (memory.py)
            self.activation_checkpointing = self.gradient_checkpointing
        inherited_post_init(super().__post_init__)

    def _precision_asked(self) -> str:
        """`--fp16 true` / `--bf16 true` (transformers' names) mean `precision` fp16 / bf16, never dropped."""
        asked = [name for name in ("bf16", "fp16") if getattr(self, name)]
        if len(asked) == 2:
            raise refuse("fp16", True, "fp16 and bf16 are both true: keep one, or use --precision bf16 or fp16")
        if asked and self.precision not in ("auto", asked[0]):
            raise refuse(asked[0], True, f"contradicts precision={self.precision}: drop --{asked[0]} and keep "
                         f"--precision {self.precision}, or use --precision {asked[0]}")
        if asked == ["fp16"] and not torch.cuda.is_available():  # bf16 runs on the CPU too, as --precision bf16
            raise refuse("fp16", True, "fp16 needs a CUDA GPU and none is visible (on CPU: fp32, or bf16): "
                         "drop --fp16")
        return asked[0] if asked else self.precision

    def _check_values(self):
        """Consistency between fields (each field alone is checked by `validate`)."""
        self.columns = parse_columns(self.columns) or None
        self.system_prompt = (self.system_prompt or "").strip() or None
        self.dataset_split = self.dataset_split or "train"
        if self.max_length is None:
            raise refuse("max_length", None, "max_length must be an integer >= 16", 1024)
        check_trackers(self.report_to)
        if self.load_in_4bit:
            require_cuda_and("load_in_4bit", "bitsandbytes", "bitsandbytes")
        if self.use_liger_kernel:  # Triton kernels for RMSNorm, RoPE, SwiGLU (TRL keeps its own fused LM head)
            require_cuda_and("use_liger_kernel", "liger_kernel", "liger-kernel")
        if self.max_steps == 0 or self.max_steps < -1:
            raise refuse("max_steps", self.max_steps, "max_steps must be > 0, or -1 to train num_train_epochs", 100)
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise refuse("num_train_epochs", self.num_train_epochs,
                         f"num_train_epochs must be > 0, got {self.num_train_epochs} (or set max_steps)", 1)
        check_optimizer_steps(self)
        if self.lora_alpha > 64 * self.lora_r:
            raise UserError(f"lora_alpha {self.lora_alpha} is over 64 x lora_r {self.lora_r}: the adapter's scale "
                            "alpha / r would blow up the update; the usual lora_alpha is r or 2 r")
        if self.overwrite_output_dir and wants_resume(self.resume_from_checkpoint):
            raise UserError("--overwrite_output_dir true and --resume_from_checkpoint contradict each other: pass "
                            "one of them (overwrite starts over, resume continues)")
        if self.num_generate > self.test_size:
            raise UserError(f"num_generate ({self.num_generate}) is larger than test_size ({self.test_size}): "
                            "lower num_generate or raise test_size")
        if not self.output_dir.strip() or "\x00" in self.output_dir:
            raise refuse("output_dir", self.output_dir, "is not a folder name", "runs/my-run")

    def to_json(self) -> str:
        """The resolved configuration as JSON (no secrets: hub tokens are never part of it)."""
        data = self.to_dict()
        data.pop("hub_token", None)
        return json.dumps(data, indent=2, sort_keys=True, default=str)


def wants_resume(value) -> bool:
    """Whether `--resume_from_checkpoint` asks to continue: a checkpoint path, or one of `RESUME_NEWEST`."""
    return value is not None and str(value).lower() not in RESUME_OFF


def parse_config(args: list[str] | None = None, **overrides) -> Config:
    """Resolve a configuration: defaults < preset < YAML (`--config F.yaml`) < flags < keyword overrides.

    `parse_config(["--preset", "smoke"])` from the command line; `parse_config(preset="smoke",
    max_steps=2)` from Python. Every value, whatever its source, is converted and checked by the same
    declared rules (`validation.validate`), and an error names the source as the user wrote it."""
    path, from_file, args = file_layer(list(args or []))
    return build_config([(f"file {path}", from_file), ("flag", parse_flags(Config, args)), ("keyword", overrides)])


def build_config(layers: list[tuple[str, dict]]) -> Config:
    """`Config` from (source, values) layers, lowest first, over the defaults and the preset named by the
    highest layer that names one; every value is checked with its source known."""
    merged, origin = merge_layers(Config, PRESETS, layers)
    with sources(origin):
        config = Config(**merged)
        _check_explicit(config, {k for k, s in origin.items() if not s.startswith("preset ")})
    return config


def _check_explicit(config: Config, given: set[str]) -> None:
    """Values the user set that contradict others (a default that does not apply is no contradiction)."""
    if "eval_steps" in given and config.eval_size == 0:
        raise UserError("eval_steps is set but eval_size is 0, so there is nothing to validate on: raise "
                        "--eval_size or drop --eval_steps")


ENV_PREFIX = "TINYLLAMA_FT_"


def notebook_config(namespace: dict, environ: dict | None = None) -> Config:
    """The notebook's configuration from its `parameters` cell and the environment.

    Precedence, lowest first: the defaults < the preset < values in `namespace` (the parameters cell,
    or papermill's `-p`) that differ from the defaults < `TINYLLAMA_FT_<FIELD>` environment variables
    (`TINYLLAMA_FT_PRESET=smoke`, `TINYLLAMA_FT_MAX_STEPS=20`). Names in `namespace` that are not
    configuration fields are ignored, so `notebook_config(globals())` works. A bad value's error names
    the variable and the value (`TINYLLAMA_FT_LORA_R=8.5: must be a whole number...`)."""
    environ = os.environ if environ is None else environ
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default_factory() for f in dataclasses.fields(Config)
                 if f.default_factory is not dataclasses.MISSING}
    changed = {k: v for k, v in namespace.items() if k in defaults and _differs(v, defaults[k])}
    from_env = {key[len(ENV_PREFIX):].lower(): value for key, value in environ.items()
                if key.startswith(ENV_PREFIX)}
    return build_config([("notebook", changed), ("variable", from_env)])


def _differs(value, default) -> bool:
    try:
        return bool(value != default)
    except Exception:  # e.g. an array in the namespace: compare by identity
        return value is not default
