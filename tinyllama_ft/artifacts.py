"""The output folder: write it (atomically), load it back for inference, export a merged model."""

from __future__ import annotations

import json
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

FINAL_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json")


def check_output_dir(config) -> None:
    """Refuse to overwrite a finished run unless asked to, or a half-written one unless resuming."""
    path = Path(config.output_dir)
    if not path.exists() or not any(path.iterdir()):
        resume_path(config)
        return
    resuming = resume_path(config) is not None  # also fails now, not after the model loads, if there is none
    if (path / "metrics.json").exists() and not config.overwrite_output_dir:
        raise UserError(f"{path} already holds a finished run: pass --overwrite_output_dir true or another "
                        "--output_dir")
    if not resuming and not config.overwrite_output_dir:
        raise UserError(f"{path} holds checkpoints of an unfinished run: pass --resume_from_checkpoint true to "
                        "continue it, or --overwrite_output_dir true to start over")


def resume_path(args) -> str | None:
    """`--resume_from_checkpoint true` means the newest complete checkpoint in `output_dir`."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "0", ""):
        return None
    if str(value).lower() not in ("true", "yes", "1"):
        if not Path(value).is_dir():
            raise UserError(f"checkpoint {value} does not exist: pass a checkpoint-N folder or true")
        return str(value)
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if last is None:
        raise UserError(f"no checkpoint to resume from in {args.output_dir}: run without "
                        "--resume_from_checkpoint, or point --output_dir at the interrupted run")
    return last


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
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} has no adapter_config.json: pass the output folder of a finished run")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors (only safetensors are loaded): "
                        "re-save the adapter with safe_serialization=True")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else
                      torch.float16 if device == "cuda" else torch.float32)
    base_name = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    tokenizer = load_tokenizer(str(path))
    model = load_model(base_name, dtype, device=device)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    _fix_generation_config(model, tokenizer)
    return model.eval(), tokenizer


def export_merged(adapter_dir: str, out_dir: str) -> Path:
    """Merge the adapter into the base weights (`merge_and_unload`) and save a standalone folder
    (safetensors, tokenizer with chat template, generation config with the right EOS)."""
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} already exists: remove it or choose another folder")
    model, tokenizer = load_for_inference(adapter_dir, device="cpu", dtype=torch.float32)
    merged = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".merging-"))
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
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


def _fix_generation_config(model, tokenizer) -> None:
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
