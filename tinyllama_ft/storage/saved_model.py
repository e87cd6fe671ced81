"""The one way in to a saved model: `load_saved(folder)` for a run folder (base + LoRA adapter), one of
its `checkpoint-N` folders (with the run's settings: `run_config.json` of the run folder it is in) or a
merged export (a plain transformers folder), on the device and in the dtype inference wants, with the
generation config, the saved system prompt and the context length; and `load_merged`, the one CPU-fp32
merge both exports write. Every command that uses a saved model (generate, chat, serve, export, GGUF)
loads through here, so each accepts the same folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel

from ..errors import UserError
from ..model.generation import context_length  # noqa: F401 (where chat and serve read it)
from ..model.loading import is_model_folder, load_model, load_tokenizer
from .files import finish_replacement
from .lock import check_not_in_use, remove_abandoned


def load_saved(folder: str, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) in eval mode from a run folder or one of its `checkpoint-N` folders (the base
    model plus the saved LoRA adapter) or from a merged export (a plain `AutoModelForCausalLM` folder,
    `python -m tinyllama_ft export`). `device` and `dtype` default to `inference_device_and_dtype`'s
    choice. The run's system prompt is `saved_system_prompt(folder)`."""
    path = Path(folder)
    check_saved_folder(path)
    device, dtype = inference_device_and_dtype(device, dtype)
    if (path / "adapter_config.json").is_file():
        base_name = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        tokenizer = load_tokenizer(str(path))
        model = PeftModel.from_pretrained(load_model(base_name, dtype, device=device), str(path), is_trainable=False)
    else:
        tokenizer = load_tokenizer(str(path))
        model = load_model(str(path), dtype, device=device)
    set_generation_config(model, tokenizer)
    return model.eval(), tokenizer


load_for_inference = load_saved  # the name the notebook and the first releases use


def load_merged(folder: str):
    """(model, tokenizer) of `folder` as one plain model on the CPU in fp32, for the exports: a run's
    adapter merged into the base weights (`merge_and_unload`, in fp32 so nothing is rounded), or a
    merged export as it is."""
    model, tokenizer = load_saved(folder, device="cpu", dtype=torch.float32)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def check_saved_folder(path: Path) -> None:
    """A run folder (or one of its checkpoints) or a merged export: fail in one line for anything else."""
    check_not_in_use(path, "--adapter")  # being written or replaced by another command
    remove_abandoned(path.parent)  # the lock and staging folders a killed command left beside it
    finish_replacement(path)  # a run that replaced another, stopped between its two renames
    if path.is_file():
        raise UserError(f"--adapter {path} is a file: pass the run folder that holds it")
    if not path.is_dir():
        raise UserError(f"--adapter {path} does not exist: pass the output folder of a finished run")
    if (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise UserError(f"{path} has no adapter_model.safetensors (only safetensors are loaded): "
                            "re-save the adapter with safe_serialization=True")
    elif not is_model_folder(path):
        raise UserError(f"{path} is neither a run folder (adapter_config.json) nor a merged export (config.json "
                        "and .safetensors weights): pass the output folder of `train` or of `export`")
    check_intact(path)


def check_intact(path: Path) -> None:
    """Every JSON file a load reads parses and every safetensors file has a whole header and all the bytes
    it announces; else one line naming the damaged file (a copy cut short, an editor's slip)."""
    for name in ("adapter_config.json", "config.json", "run_config.json", "tokenizer_config.json",
                 "generation_config.json", "tokenizer.json"):
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise UserError(f"{file} is damaged ({type(error).__name__}: {str(error).splitlines()[0]}): restore "
                                "it from a copy, or export / train the folder again") from None
    for file in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            raise UserError(f"{file} is damaged ({problem}): restore it from a copy, or export / train the folder "
                            "again")


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON header, data size)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, not a safetensors file"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return "its header is cut short"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            and isinstance(entry, dict) and "data_offsets" in entry]
    if ends and 8 + length + max(ends) > size:
        return f"truncated: {size} of {8 + length + max(ends)} bytes"
    return None


def run_folder_of(folder: str | Path) -> Path:
    """The folder holding the run's settings (`run_config.json`) for a saved folder: the folder itself (a run
    folder, a merged export), or for a `checkpoint-N` without them, the run folder it is in."""
    path = Path(folder)
    if (not (path / "run_config.json").is_file() and re.fullmatch(r"checkpoint-\d+", path.name)
            and (path.parent / "run_config.json").is_file()):
        return path.parent
    return path


def saved_settings(folder: str | Path) -> dict:
    """The run's resolved configuration (`run_config.json`, see `run_folder_of`); {} when there is none."""
    path = run_folder_of(folder) / "run_config.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error}): it records the run's settings and system prompt; restore "
                        "it, or pass --system_prompt") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} holds no JSON object: restore the run's run_config.json")
    return settings


def saved_system_prompt(folder: str) -> str | None:
    """The system prompt the run was trained with (`saved_settings`), so inference formats prompts the same."""
    return saved_settings(folder).get("system_prompt") or None


def base_model_name(folder: str) -> str:
    """The model a saved folder was tuned from: the adapter's base, else the run's `model_name_or_path`
    (a merged export carries its run's `run_config.json`), else the folder itself."""
    if (Path(folder) / "adapter_config.json").is_file():
        return PeftConfig.from_pretrained(folder).base_model_name_or_path
    return saved_settings(folder).get("model_name_or_path") or folder


def inference_device_and_dtype(device: str | None = None, dtype: torch.dtype | None = None):
    """CUDA in bf16 (fp16 where bf16 is unsupported) when there is a GPU, else the CPU in fp32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else
                      torch.float16 if device == "cuda" else torch.float32)
    return device, dtype


DEFAULT_MAX_NEW_TOKENS = 256  # generate's and chat's default answer budget


def set_generation_config(model, tokenizer) -> None:
    """The model's own generation settings, which a merged export saves as `generation_config.json`: greedy (as
    `generate` answers), stopping at the tokenizer's EOS, padding with its pad token, `DEFAULT_MAX_NEW_TOKENS`
    new tokens. So `pipeline("text-generation")` with no generation arguments answers as `generate` does, not
    with its sampling defaults (temperature 0.7), and `model.generate(ids)` stops at EOS, not after 20 tokens."""
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.do_sample, config.num_beams, config.max_new_tokens = False, 1, DEFAULT_MAX_NEW_TOKENS
    config.temperature = config.top_p = config.top_k = None  # a base's sampling settings would only warn
    config.max_length = None  # max_new_tokens is the budget (TinyLlama-Chat's file says max_length 2048)
