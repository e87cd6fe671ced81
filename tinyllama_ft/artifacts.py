"""The output folder: write it (atomically), load it back for inference, export a merged model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel

from transformers.trainer_utils import get_last_checkpoint

from .card import read_run, write_card
from .errors import UserError
from .modeling import load_model, load_tokenizer

log = logging.getLogger(__name__)

FINAL_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json")


def check_output_dir(config) -> None:
    """Decide, before anything loads, what `config.output_dir` holds and whether this run may use it.

    * nothing, or nothing to lose (no complete checkpoint: a run stopped before its first one, a
      notebook's plots, staging leftovers): start; leftovers of a stopped save are removed;
    * a finished run (`metrics.json`): refuse, unless `--overwrite_output_dir true`;
    * complete checkpoints of an unfinished run: refuse, unless `--resume_from_checkpoint true`
      (continue) or `--overwrite_output_dir true` (start over: the old checkpoints are removed)."""
    path = Path(config.output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file, not a folder: pass a folder path (it is created)")
    resume = resume_path(config)  # an explicit checkpoint that is not one fails now, not after the model loads
    if not path.is_dir():
        _log_fresh_start(config, path)
        return
    if is_model_folder(path):
        raise UserError(f"--output_dir {path} holds a model (config.json and model weights), not a run: pass "
                        "another --output_dir")
    if (path / "metrics.json").exists() and not config.overwrite_output_dir:
        raise UserError(f"{path} already holds a finished run: pass --overwrite_output_dir true or another "
                        "--output_dir")
    if config.overwrite_output_dir:
        remove_run_state(path)
    elif resume is None and get_last_checkpoint(str(path)) is not None:
        raise UserError(f"{path} holds checkpoints of an unfinished run: pass --resume_from_checkpoint true to "
                        "continue it, or --overwrite_output_dir true to start over")
    remove_staging(path)
    if resume is None:
        _log_fresh_start(config, path)


def _log_fresh_start(config, path: Path) -> None:
    if _wants_resume(config.resume_from_checkpoint) and str(config.resume_from_checkpoint).lower() in TRUE:
        log.info("no checkpoint in %s yet: starting from the beginning", path)


def remove_staging(path: Path) -> None:
    """Remove what a stopped save leaves (`.tmp-checkpoint-N`, `.tmp-final`): never part of a run.
    Only the main process removes, so that no process deletes what another is writing."""
    if not _main_process():
        return
    for leftover in path.glob(".tmp-*"):
        log.info("removing %s, left by a save that did not finish", leftover)
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def remove_run_state(path: Path) -> None:
    """`--overwrite_output_dir true`: the old run's `metrics.json` and checkpoints go first, so the
    folder never looks finished, nor resumable, with another run's state."""
    if not _main_process():
        return
    (path / "metrics.json").unlink(missing_ok=True)
    for checkpoint in path.glob("checkpoint-*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


TRUE = ("true", "yes", "1")


def _wants_resume(value) -> bool:
    return value is not None and str(value).lower() not in ("false", "no", "0", "", "none")


def resume_path(args) -> str | None:
    """`--resume_from_checkpoint true` means the newest complete checkpoint in `output_dir`, or None
    (start from the beginning) when there is none yet; a path must be a checkpoint folder."""
    value = args.resume_from_checkpoint
    if not _wants_resume(value):
        return None
    if str(value).lower() not in TRUE:
        path = Path(value)
        if not path.exists():
            raise UserError(f"checkpoint {value} does not exist: pass a checkpoint-N folder or true")
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"{value} is not a checkpoint (no trainer_state.json): pass a checkpoint-N folder "
                            "of a run, or true for the newest one in --output_dir")
        return str(value)
    return get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None


def restart_hint(config) -> str:
    """What to type after a stop: resume where a complete checkpoint exists, else the same command."""
    last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
    if last is not None:
        return f"run the same command with --resume_from_checkpoint true to continue from {Path(last).name}"
    return "no checkpoint was written yet: run the same command again"


def save_run(config, model, tokenizer, metrics: dict, split: dict, log_history: list, generations: dict,
             trainer=None) -> Path:
    """Adapter, tokenizer (with chat template), resolved config, split, log history, generations and
    metrics into `config.output_dir`. Files are written to a hidden folder inside it and moved in,
    `metrics.json` last, so a folder with `metrics.json` is always complete.

    With `trainer`, the adapter is written by `trainer.save_model`, which gathers adapters that
    FSDP or DeepSpeed ZeRO-3 shard: then call this on every process; only the main one writes."""
    out = Path(config.output_dir)
    staging = out / ".tmp-final"
    if trainer is not None:
        trainer.save_model(str(staging))  # a collective under ZeRO-3 / FSDP
        if not trainer.is_world_process_zero():
            return out
    else:
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; run_config.json says the same
    tokenizer.save_pretrained(staging)
    for name, data in (("run_config.json", json.loads(config.to_json())), ("split.json", split),
                       ("log_history.json", log_history), ("generations.json", generations),
                       ("metrics.json", metrics)):
        _write_json(staging / name, data)
    write_card(staging, json.loads(config.to_json()), metrics, tokenizer)  # replaces PEFT's empty template
    for name in sorted(os.listdir(staging), key=lambda n: n == "metrics.json"):
        if (staging / name).is_file():
            os.chmod(staging / name, 0o644)  # safetensors writes 0600; the folder is meant to be shared
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        os.replace(staging / name, out / name)
    staging.rmdir()
    return out


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def load_for_inference(adapter_dir: str, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a run folder: the base model plus the saved LoRA adapter, in eval mode."""
    path = Path(adapter_dir)
    check_adapter_dir(path)
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors (only safetensors are loaded): "
                        "re-save the adapter with safe_serialization=True")
    device, dtype = inference_device_and_dtype(device, dtype)
    base_name = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    tokenizer = load_tokenizer(str(path))
    model = load_model(base_name, dtype, device=device)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    _fix_generation_config(model, tokenizer)
    return model.eval(), tokenizer


def is_model_folder(path: Path) -> bool:
    """A full (e.g. merged) transformers model: a config and safetensors weights, no adapter."""
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def inference_device_and_dtype(device: str | None = None, dtype: torch.dtype | None = None):
    """CUDA in bf16 (fp16 where bf16 is unsupported) when there is a GPU, else the CPU in fp32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else
                      torch.float16 if device == "cuda" else torch.float32)
    return device, dtype


def check_export_out(adapter_dir: str, out: Path) -> None:
    """`export --out` must be a new folder outside the run folder."""
    if out.is_file():
        raise UserError(f"--out {out} is an existing file: choose a new folder")
    if out.exists():
        raise UserError(f"{out} already exists: remove it or choose another folder")
    if Path(adapter_dir).resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the run folder {adapter_dir}: choose a folder outside it "
                        "(e.g. beside it), so the run folder stays a run")


def check_adapter_dir(path: Path) -> None:
    """A run folder (or one of its checkpoints): fail in one line for anything else."""
    if path.is_file():
        raise UserError(f"--adapter {path} is a file: pass the run folder that holds it")
    if not path.is_dir():
        raise UserError(f"--adapter {path} does not exist: pass the output folder of a finished run")
    if not (path / "adapter_config.json").is_file():
        if is_model_folder(path):
            raise UserError(f"{path} holds a full (merged) model, not a LoRA adapter: load it with "
                            "AutoModelForCausalLM.from_pretrained, or pass the run folder it was exported from")
        raise UserError(f"{path} has no adapter_config.json: pass the output folder of a finished run")


def export_merged(adapter_dir: str, out_dir: str) -> Path:
    """Merge the adapter into the base weights (`merge_and_unload`) and save a standalone folder
    (safetensors, tokenizer with chat template, generation config with the right EOS)."""
    out = Path(out_dir)
    check_export_out(adapter_dir, out)
    model, tokenizer = load_for_inference(adapter_dir, device="cpu", dtype=torch.float32)
    merged = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".merging-"))
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if (Path(adapter_dir) / "run_config.json").is_file():  # the system prompt travels with the model
        shutil.copy(Path(adapter_dir) / "run_config.json", tmp / "run_config.json")
    write_card(tmp, *read_run(adapter_dir), tokenizer, merged_to=out_dir)
    os.replace(tmp, out)
    return out


def push_to_hub(folder: str, repo_id: str) -> str:
    """Upload a folder to a (private) hub repo; returns a one-line outcome. Skipped, with the reason,
    when there is no token or no network. The token is read by huggingface_hub, never printed."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        return f"push skipped: no hub token (set HF_TOKEN or run `hf auth login`); {folder} is saved locally"
    api = HfApi()
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id)
    except Exception as error:  # no network, no permission: the local folder is still complete
        return f"push skipped: could not upload to {repo_id} ({type(error).__name__}); {folder} is saved locally"
    return f"pushed {folder} to {repo_id}"


def saved_system_prompt(run_dir: str) -> str | None:
    """The system prompt a run was trained with (`run_config.json`), so inference formats prompts the same."""
    path = os.path.join(run_dir, "run_config.json")
    if not os.path.isfile(path):
        return None  # load_for_inference says what is missing
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file).get("system_prompt") or None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error}): it records the run's system prompt; restore it or pass "
                        "--system_prompt") from None


DEFAULT_MAX_NEW_TOKENS = 256  # generate's and chat's default answer budget


def _fix_generation_config(model, tokenizer) -> None:
    """The model's own generation settings, which a merged export saves as `generation_config.json`: greedy
    (as `generate` answers), stopping at the tokenizer's EOS, `DEFAULT_MAX_NEW_TOKENS` new tokens. So
    `pipeline("text-generation")` with no generation arguments answers as `generate` does, not with its
    sampling defaults (temperature 0.7), and `model.generate(ids)` stops at EOS, not at 20 tokens."""
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.do_sample, config.num_beams, config.max_new_tokens = False, 1, DEFAULT_MAX_NEW_TOKENS
    config.temperature = config.top_p = config.top_k = None  # sampling settings of the base would only warn
    config.max_length = None  # a base's max_length (TinyLlama-Chat's 2048) would cap nothing max_new_tokens does not
