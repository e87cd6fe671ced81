"""`export --format gguf-adapter`: the run's LoRA adapter as a llama.cpp LoRA GGUF, beside a GGUF of the base model.

llama.cpp applies the adapter when it loads the base (`llama-cli -m BASE --lora ADAPTER`, llama-cpp-python's
`lora_path`, Ollama's `ADAPTER`), so one base file serves many runs. The adapter file holds what llama.cpp's own
`convert_lora_to_gguf.py` writes: `general.type` adapter, `adapter.type` lora, `adapter.lora.alpha`, and for each
adapted weight its `.lora_a` (r x in) and `.lora_b` (out x r) under the weight's GGUF name, lora_b's rows of q/k
permuted as the weight's are. llama.cpp scales the update by alpha / r, so an rsLoRA adapter (alpha / sqrt(r)) is
written with alpha x sqrt(r). The base file is `--format gguf`'s writer on the base weights: the same vocabulary and
chat template, so the prompt ids are `encode_prompt`'s. DoRA has no llama.cpp form: `--format gguf` merges it.
`tests/test_gguf_adapter.py` proves base + adapter in llama.cpp answers like the merged GGUF."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..storage.files import written_folder
from .gguf import QUANTIZATIONS, permute_rotary, write_gguf, write_modelfile

log = logging.getLogger(__name__)

LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)\.weight")


def export_gguf_adapter(adapter_dir: str, out_dir: str, quantization: str = "f16") -> Path:
    """Write `out_dir/<base>-<quantization>.gguf` (the base model), `out_dir/<run>-lora-f32.gguf` (the adapter) and
    an Ollama `Modelfile` (FROM the base, ADAPTER the adapter); returns the adapter's path. Written into a hidden
    folder and renamed, so `out_dir` is whole or absent."""
    from ..data.chat_template import prefixes_first_text_only
    from ..model.loading import load_model, load_tokenizer
    from ..storage.saved_model import base_model_name, check_saved_folder, saved_system_prompt
    from .gguf import _tokenizer_model_of
    from .merged import check_export_out

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf sentencepiece") from None
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    out, folder = Path(out_dir), Path(adapter_dir)
    check_export_out(adapter_dir, out)
    check_saved_folder(folder)
    settings = adapter_settings(folder)
    spm_dir = _tokenizer_model_of(adapter_dir)
    base_name = base_model_name(adapter_dir)
    base, tokenizer = load_model(base_name, torch.float32, device="cpu"), load_tokenizer(adapter_dir)
    run_name = folder.resolve().name
    base_file, adapter_file = f"{Path(base_name).name}-{quantization}.gguf", f"{run_name}-lora-f32.gguf"
    with written_folder(out, "gguf") as tmp:
        write_gguf(base, tokenizer, tmp / base_file, quantization, spm_dir=spm_dir, name=Path(base_name).name)
        write_lora_gguf(folder, base.config, settings, tmp / adapter_file, run_name)
        write_modelfile(tmp / "Modelfile", base_file, base.config.max_position_embeddings,
                        system_prompt=saved_system_prompt(adapter_dir) or "",
                        leading_space=prefixes_first_text_only(tokenizer), adapter=adapter_file)
    log.info("wrote %s and %s (%.1f MB), and %s", out / base_file, out / adapter_file,
             (out / adapter_file).stat().st_size / 1e6, out / "Modelfile")
    return out / adapter_file


def adapter_settings(folder: Path) -> dict:
    """adapter_config.json of a run folder, refused in one line where llama.cpp's LoRA cannot hold it."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{folder} holds no LoRA adapter (a merged export): --format gguf-adapter needs a run "
                        "folder; --format gguf writes a merged model")
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("use_dora"):
        raise UserError(f"{folder} is a DoRA adapter, which llama.cpp's LoRA cannot apply: use --format gguf (the "
                        "adapter merged into one file)")
    if settings.get("modules_to_save") or settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise UserError(f"{folder}'s adapter has modules_to_save or per-layer ranks, which llama.cpp's LoRA "
                        "cannot hold: use --format gguf")
    return settings


def llama_cpp_alpha(settings: dict) -> float:
    """The alpha llama.cpp needs for PEFT's scale: it scales by alpha / r; rsLoRA's scale is alpha / sqrt(r)."""
    alpha, rank = float(settings["lora_alpha"]), int(settings["r"])
    return alpha * math.sqrt(rank) if settings.get("use_rslora") else alpha


def write_lora_gguf(folder: Path, config, settings: dict, path: Path, name: str) -> Path:
    """The adapter's lora_A / lora_B pairs (f32) under llama.cpp's names, with its alpha, as one GGUF."""
    import gguf
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        match = LORA_TENSOR.fullmatch(key)
        if match is None:
            raise UserError(f"{folder}: the adapter tensor {key} is not a LoRA A/B matrix: use --format gguf")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor.to(torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, llama_cpp_alpha(settings))
    writer.add_name(name)
    for module, pair in sorted(pairs.items()):
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or set(pair) != {"A", "B"}:
            raise UserError(f"{folder}: no llama.cpp tensor for the adapted module {module}: use --format gguf")
        lora_b = pair["B"].numpy()
        if module.endswith("q_proj"):
            lora_b = permute_rotary(lora_b, config.num_attention_heads, config.num_attention_heads)
        elif module.endswith("k_proj"):
            lora_b = permute_rotary(lora_b, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(f"{target}.lora_a", pair["A"].numpy())
        writer.add_tensor(f"{target}.lora_b", lora_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
