"""GGUF export: the merged model as one `.gguf` file for llama.cpp and Ollama, plus an Ollama `Modelfile`.

The `gguf` package (maintained with llama.cpp) does the file format, the tensor-name map, the
SentencePiece vocabulary, the special tokens and Q8_0. What is written here is only the Llama glue
that llama.cpp's `convert_hf_to_gguf.py` also hand-writes: the hyperparameter keys, the q/k row
permutation, tied embeddings (no `output.weight`), which tensors stay f32, and the vocabulary of a
byte-level BPE (the tiny smoke model). `tests/test_gguf.py` proves the file is the same model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..data.chat_template import prefixes_first_text_only
from ..data.encoding import ROLE_MARKERS
from ..errors import UserError, on_failure
from ..storage.files import written_folder
from ..storage.lock import folder_lock

log = logging.getLogger(__name__)

QUANTIZATIONS = ("f16", "q8_0", "f32")  # f32: the merged weights exactly (4 bytes a weight)

# TinyLlama-Chat's format in Ollama's Go template language: every message is "<|role|>\n{content}</s>\n",
# then "<|assistant|>\n" opens the answer -- what the HF chat template renders with add_generation_prompt=True
# (tests/test_gguf.py renders both). Ollama puts SYSTEM first as a message.
OLLAMA_TEMPLATE = '{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n'

# Where the HF tokenizer puts SentencePiece's "▁" prefix only before the first text (Metaspace prepend_scheme
# "first", TinyLlama's `legacy: false`), llama.cpp cannot follow: it prefixes the text after every special token
# (one stray "▁" after each `</s>` of a chat prompt) or, with add_space_prefix off, none. So the file says
# add_space_prefix = false, and the text begins with one space, which llama.cpp turns into that first "▁": the
# saved chat template writes it after the BOS (data/chat_template.py), the Modelfile's template first of all. Then the
# prompt ids equal encode_prompt's (tests/test_consumers.py, through each consumer's own chat path).
OLLAMA_SPACE = '{{ " " }}'


def export_gguf(adapter_dir: str, out_dir: str, quantization: str = "f16") -> Path:
    """Merge the adapter (`load_merged`) and write `out_dir/<run>-<quantization>.gguf` and an Ollama
    `Modelfile` next to it. Written into a hidden folder and renamed, so `out_dir` is whole or absent."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf sentencepiece") from None

    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    out = Path(out_dir)
    with on_failure(out, f"{out} was not created"), folder_lock(out, "export"):
        return _export_gguf(adapter_dir, out, quantization)


def _export_gguf(adapter_dir: str, out: Path, quantization: str) -> Path:
    from .merged import check_export_out
    from ..storage.saved_model import check_saved_folder, load_merged, saved_system_prompt

    check_export_out(adapter_dir, out)
    check_saved_folder(Path(adapter_dir))
    spm_dir = _tokenizer_model_of(adapter_dir)  # a missing tokenizer.model fails before the weights load
    merged, tokenizer = load_merged(adapter_dir)
    run_name = Path(adapter_dir).resolve().name
    name = f"{run_name}-{quantization}.gguf"
    with written_folder(out, "export") as tmp:
        write_gguf(merged, tokenizer, tmp / name, quantization, spm_dir=spm_dir, name=run_name)
        write_modelfile(tmp / "Modelfile", name, merged.config.max_position_embeddings,
                        system_prompt=saved_system_prompt(adapter_dir) or "",
                        leading_space=prefixes_first_text_only(tokenizer))
    log.info("wrote %s (%.1f MB) and %s", out / name, (out / name).stat().st_size / 1e6, out / "Modelfile")
    return out / name


def _tokenizer_model_of(folder: str) -> str | None:
    from ..model.loading import load_tokenizer
    from ..storage.saved_model import base_model_name

    return find_tokenizer_model(folder, base_model_name(folder), load_tokenizer(folder))


# --- the file --------------------------------------------------------------------------------------

def write_gguf(model, tokenizer, path: Path, quantization: str = "f16", spm_dir: str | None = None,
               name: str = "model") -> Path:
    """One GGUF (architecture `llama`) with `model`'s weights and `tokenizer`'s vocabulary and chat template.
    `model=None` writes a vocabulary-only file (what llama.cpp's `--vocab-only` writes)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    if model is not None:
        add_hyperparameters(writer, model.config, quantization)
    add_vocabulary(writer, tokenizer, spm_dir, n_vocab=model.config.vocab_size if model is not None else None)
    if model is not None:
        add_tensors(writer, model, quantization)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_hyperparameters(writer, config, quantization: str) -> None:
    """The llama.* keys llama.cpp reads, from the HF config (as `convert_hf_to_gguf.py` LlamaModel does)."""
    import gguf

    if config.model_type != "llama":
        raise UserError(f"GGUF export supports Llama models, not {config.model_type!r}: export with "
                        "`export` (no --format) and convert with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope scaling {rope['rope_type']!r} is not exported: use llama.cpp's convert_hf_to_gguf.py")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "f32": gguf.LlamaFileType.ALL_F32}[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tensors(writer, model, quantization: str) -> None:
    """Every weight under its GGUF name: q/k rows permuted to GGUF's rotary layout, 1-D tensors (norms)
    in f32, matrices in f16, f32 or Q8_0 (f16 where a row is not a multiple of Q8_0's 32-value block)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"no GGUF name for the tensor {hf_name}: this architecture is not exported here")
        data = tensor.detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads, config.num_key_value_heads)
        add_tensor(writer, gguf_name, data, quantization)


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """HF stores each head's rotary halves [x0..x(d/2-1), x(d/2)..]; GGUF interleaves them (pairs).
    The same permutation as convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def add_tensor(writer, name: str, data: np.ndarray, quantization: str) -> None:
    import gguf

    if data.ndim == 1 or quantization == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    if quantization == "q8_0":
        try:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            return
        except gguf.QuantError:
            log.info("%s: rows of %d values are not Q8_0 blocks of 32; kept in f16", name, data.shape[-1])
    writer.add_tensor(name, data.astype(np.float16))


# --- the vocabulary --------------------------------------------------------------------------------

def add_vocabulary(writer, tokenizer, spm_dir: str | None, n_vocab: int | None = None) -> None:
    """Tokens, scores and types (SentencePiece, from `tokenizer.model`; or a byte-level BPE with its merges),
    BOS/EOS/unknown/pad ids, add_bos_token and the chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        if spm_dir is not None:
            tokens, scores, types = _sentencepiece_tokens(spm_dir)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
        else:
            tokens, scores, types = _byte_level_tokens(tokenizer, saved)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split regex
        if n_vocab is not None and len(tokens) != n_vocab:
            raise UserError(f"the tokenizer has {len(tokens)} tokens but the model's embedding has {n_vocab} rows: "
                            "export a model whose vocabulary matches its tokenizer")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(saved, load_merges=spm_dir is None, n_vocab=len(tokens))
    # One BOS first, as encode_prompt: the chat template writes it, and llama.cpp adds it where the text does not
    # begin with it (a raw prompt, Ollama's Go template); llama-server --jinja strips the template's own first.
    special.add_special_token = {"bos": True, "eos": False}
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    first_only = prefixes_first_text_only(tokenizer)
    if spm_dir is not None:
        writer.add_add_space_prefix(not first_only)
    special.chat_template = tokenizer.chat_template  # the saved one: it writes the BOS (and the space after it)
    special.add_to_gguf(writer, quiet=True)


def _sentencepiece_tokens(spm_dir: str) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    tokens, scores, types = [], [], []
    for text, score, token_type in gguf.SentencePieceVocab(Path(spm_dir)).all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(token_type))
    return tokens, scores, types


def _byte_level_tokens(tokenizer, saved: str) -> tuple[list[str], list[float], list[int]]:
    """A GPT-2 style byte-level BPE (the tiny smoke tokenizer): tokens in id order, as the file spells them."""
    import gguf

    model = json.loads(Path(saved, "tokenizer.json").read_text(encoding="utf-8"))
    pre = model.get("pre_tokenizer") or {}
    if model["model"]["type"] != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UserError("the tokenizer is neither SentencePiece (no tokenizer.model) nor a GPT-2 byte-level BPE: "
                        "convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError("the tokenizer's ids are not contiguous: it cannot be written as a GGUF vocabulary")
    special = set(tokenizer.all_special_ids)
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(by_id))]
    return tokens, [0.0] * len(tokens), types


def find_tokenizer_model(adapter_dir: str, base_name: str, tokenizer) -> str | None:
    """The folder holding the SentencePiece `tokenizer.model` of this tokenizer: the run folder, the base
    model's folder, or the hub cache of the base model. None for a byte-level BPE (no SentencePiece).
    A SentencePiece tokenizer without its model file is an error (scores cannot be guessed)."""
    if not _is_sentencepiece(tokenizer):
        return None
    for folder in (adapter_dir, base_name):
        if (Path(folder) / "tokenizer.model").is_file():
            return _checked(str(folder), tokenizer)
    try:
        from huggingface_hub import hf_hub_download

        return _checked(str(Path(hf_hub_download(base_name, "tokenizer.model")).parent), tokenizer)
    except Exception:  # offline and not cached, no such repo, no such file
        pass
    raise UserError(f"the SentencePiece tokenizer.model of {base_name} was not found (in {adapter_dir}, the base "
                    "model folder or the hub cache): copy the base model's tokenizer.model into the run folder")


def _is_sentencepiece(tokenizer) -> bool:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    return model["type"] == "Unigram" or (model["type"] == "BPE" and bool(model.get("byte_fallback")))


def _checked(folder: str, tokenizer) -> str:
    """`folder`'s tokenizer.model must spell every piece exactly as `tokenizer` does."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    vocab = tokenizer.get_vocab()
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if len(pieces) != len(vocab) or any(vocab.get(piece) != i for i, piece in enumerate(pieces)):
        raise UserError(f"{folder}/tokenizer.model does not match the run's tokenizer ({len(pieces)} vs "
                        f"{len(vocab)} tokens, or other pieces): put the right tokenizer.model in the run folder")
    return folder


# --- Ollama ---------------------------------------------------------------------------------------------

def modelfile_text(gguf_name: str, context_length: int, system_prompt: str = "", leading_space: bool = True,
                   adapter: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF (and a LoRA `adapter` GGUF on it), TinyLlama-Chat's template, stops at `</s>`
    and the role markers. Greedy (temperature 0, no repeat penalty: Ollama's default 1.1 would change the answer), so
    `ollama run` answers as `python -m tinyllama_ft generate` does; `/set parameter temperature 0.7` to sample."""
    template = (OLLAMA_SPACE if leading_space else "") + OLLAMA_TEMPLATE
    lines = [f"FROM ./{gguf_name}", *([f"ADAPTER ./{adapter}"] if adapter else []), f'TEMPLATE """{template}"""']
    if system_prompt:
        if '"""' in system_prompt:
            raise UserError('the system prompt contains """, which a Modelfile cannot quote: remove it')
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += ['PARAMETER stop "</s>"', *(f'PARAMETER stop "{marker}"' for marker in ROLE_MARKERS),
              "PARAMETER temperature 0", "PARAMETER repeat_penalty 1", f"PARAMETER num_ctx {context_length}"]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, context_length: int, system_prompt: str = "",
                    leading_space: bool = True, adapter: str | None = None) -> Path:
    path.write_text(modelfile_text(gguf_name, context_length, system_prompt, leading_space, adapter),
                    encoding="utf-8")
    return path
