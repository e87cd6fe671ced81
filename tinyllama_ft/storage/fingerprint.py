"""What defines a run, written into each checkpoint (`run_fingerprint.json`) and compared when a run
resumes: a resumed run continues the same run, or is refused in one line naming every changed setting.

Defining (a change is refused): the model; the data (its content hash where it is local, whatever the path's
spelling; a hash of the training rows' token ids and labels, in order; and the settings that choose and format
them); the LoRA shape, targets and kind (DoRA, rsLoRA); the optimizer and schedule; the batch (per device,
accumulation, processes); the precision; the seed. A DPO stage's list is `DPO_DEFINING`, with a hash of its SFT
adapter's weights and of its pairs.

Free to change (they cannot alter what is learned; the new values apply from the resumed step on and are
what `run_config.json` records): logging_steps, eval_steps, eval_strategy, save_steps, save_total_limit,
per_device_eval_batch_size, num_generate, max_new_tokens, report_to, disable_tqdm, log_level,
gradient_checkpointing, lm_head_labelled_only, lm_head_implementation, tokenization_cache,
dataloader_num_workers."""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..settings.paths import data_identity

log = logging.getLogger(__name__)

FILE = "run_fingerprint.json"
DEFINING = ("model_name_or_path", "dataset_name", "dataset_config", "dataset_split", "dataset_format", "columns",
            "system_prompt", "train_size", "eval_size", "test_size", "max_length", "seed", "data_seed",
            "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "use_rslora", "load_in_4bit",
            "precision", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "num_train_epochs",
            "max_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
            "max_grad_norm", "label_smoothing_factor", "neftune_noise_alpha", "per_device_train_batch_size",
            "gradient_accumulation_steps", "padding_free", "packing")
# A DPO stage (training/dpo.py): its SFT adapter (`sft_adapter`, a hash of its weights: the policy's start and the
# reference), its pairs, DPO's loss and the same optimizer, schedule, batch, precision and seed.
DPO_DEFINING = ("model_name_or_path", "dataset_name", "dataset_config", "dataset_split", "columns", "system_prompt",
                "train_size", "eval_size", "max_length", "seed", "data_seed", "precision", "beta", "loss_type",
                "label_smoothing", "loss_weights", "ld_alpha", "use_weighting", "f_divergence_type",
                "f_alpha_divergence_coef", "discopop_tau", "precompute_ref_log_probs", "sync_ref_model",
                "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "num_train_epochs",
                "max_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps")
ROW_KEYS = ("input_ids", "labels")  # an SFT row as the model sees it; a DPO pair: PAIR_KEYS
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
# A checkpoint that does not record these was trained with their value here (the plain LoRA).
UNRECORDED = {"use_dora": False, "use_rslora": False}
CADENCE = ("logging_steps", "eval_steps", "save_steps")  # transformers keeps the checkpoint's; we apply the new


def rows_hash(examples: list[dict], keys: tuple[str, ...] = ROW_KEYS) -> str:
    """sha256 of the training rows as the model sees them (their `keys`: ids and labels, in order)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example[key] for key in keys]).encode())
    return digest.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(config, train_examples: list[dict], defining: tuple[str, ...] = DEFINING,
                keys: tuple[str, ...] = ROW_KEYS, **extra) -> dict:
    """What defines the run of `config` on `train_examples`: its `defining` settings, `extra` values, a hash of the
    rows (`rows_hash` of their `keys`) and the number of processes."""
    values = {name: _plain(getattr(config, name, None)) for name in defining} | extra
    if "dataset_name" in values:  # the data by its content: another spelling of the same file is the same run
        values["dataset_name"] = data_identity(values["dataset_name"])
    return values | {"training_rows": rows_hash(train_examples, keys),
                     "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def _plain(value):
    if isinstance(value, enum.Enum):  # transformers' SchedulerType, OptimizerNames: their names as typed
        return value.value
    return value if value is None or isinstance(value, (bool, int, float, str, list, dict)) else str(value)


def read_fingerprint(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / FILE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {FILE} (written by an older version or another tool), so it cannot be "
                        "checked that it continues this run: start over with --overwrite_output_dir true")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({error}): resume from an earlier checkpoint-N, or start over with "
                        "--overwrite_output_dir true") from None


def check_resume(checkpoint: str, now: dict) -> None:
    """Refuse, in one line naming every change, to resume `checkpoint` with settings that define another run
    (`now`: this command's `fingerprint`)."""
    saved = read_fingerprint(checkpoint)
    changed = [("the SFT adapter (its weights changed)" if name == "sft_adapter" else
                f"{name} {_show(saved.get(name, UNRECORDED.get(name)))} -> {_show(now[name])}")
               for name in now if name != "training_rows" and saved.get(name, UNRECORDED.get(name)) != now[name]]
    if saved.get("training_rows") != now["training_rows"] and not changed:
        changed.append("the training rows (the dataset file changed)")
    elif saved.get("training_rows") != now["training_rows"]:
        changed.append("hence the training rows")
    if changed:
        raise UserError(f"{Path(checkpoint).name} is another run than this command's: {'; '.join(changed)}: resume "
                        "with the checkpoint's settings, or start over with --overwrite_output_dir true")


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def apply_new_cadence(state, args) -> None:
    """After a resume, the logging/eval/save steps of this command, not the checkpoint's (transformers keeps
    the checkpoint's and warns); logged, so the change is visible."""
    before = {name: getattr(state, name, None) for name in CADENCE}
    state.compute_steps(args, state.max_steps)
    changed = {name: (before[name], getattr(state, name)) for name in CADENCE if before[name] != getattr(state, name)}
    if changed:
        log.info("resumed with %s", ", ".join(f"{name} {new:g} (the checkpoint had {old:g})"
                                              for name, (old, new) in changed.items()))


class _CadenceWarning(logging.Filter):
    """Drops transformers' resume warning about logging/eval/save steps: the new ones apply (`apply_new_cadence`)."""

    def filter(self, record) -> bool:
        return "do not match the ones in the `trainer_state.json`" not in record.getMessage()


logging.getLogger("transformers.trainer_utils").addFilter(_CadenceWarning())
