"""Tokenizer and base model from a hub id or a folder, the one check of the model's shape against the
settings, the LoRA wrap, and a tiny random Llama."""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..data.chat_template import add_bos_to_template
from ..errors import UserError
from ..settings.config import SAMPLE_DATA, TINY_RANDOM_LLAMA
from ..settings.hub import check_on_hub

log = logging.getLogger(__name__)

# TinyLlama-1.1B-Chat-v1.0's (Zephyr) chat template, given to the tiny random model too.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer with a pad token (its EOS when it has none) and a chat template."""
    if name_or_path == TINY_RANDOM_LLAMA:
        return build_tiny_tokenizer()
    _check_local_folder(name_or_path, need_weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UserError(f"could not load a tokenizer from {name_or_path!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(f"{name_or_path} has no chat template: use a chat model such as TinyLlama-1.1B-Chat")
    add_bos_to_template(tokenizer)  # saved with the run: every consumer of the template gets encode_prompt's ids
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
               trust_remote_code: bool = False, device: str | None = None, load_in_4bit: bool = False):
    """The base causal LM in `dtype` (frozen weights are held in the compute dtype), or in 4-bit NF4
    with double quantisation and `dtype` compute (QLoRA) when `load_in_4bit`."""
    if name_or_path == TINY_RANDOM_LLAMA and not load_in_4bit:
        model = build_tiny_model().to(dtype)
    else:
        _check_local_folder(name_or_path, need_weights=True)
        quantization = {}
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            quantization = dict(device_map={"": device or 0}, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, attn_implementation=attn_implementation or default_attention(),
                trust_remote_code=trust_remote_code, use_safetensors=True, **quantization)
        except OSError as error:
            raise UserError(f"could not load model {name_or_path!r}: {str(error).splitlines()[0]}") from None
    if device is not None and not load_in_4bit:
        model.to(device)
    return model


def check_model_shape(config) -> None:
    """Fail before any weights load where the settings contradict the model's shape, read from its config
    alone (a meta model; the tiny random one is built for real, as a meta model cannot be under ZeRO-3):
    a `lora_target_modules` name the architecture lacks, a `max_length` beyond its positions, a LoRA
    rank above the layers it adapts."""
    model = _shape_model(config.model_name_or_path, config.trust_remote_code)
    _check_targets(model, config.lora_target_modules)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.max_length > positions:
        raise UserError(f"max_length {config.max_length} is beyond the model's {positions} positions "
                        f"(max_position_embeddings): use --max_length {positions} or less")
    every = list(config.lora_target_modules) == [ALL_LINEAR]
    widths = {name.rsplit(".", 1)[-1]: min(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and (name.rsplit(".", 1)[-1] in config.lora_target_modules
                                                     or every and not name.endswith("lm_head"))}
    if widths and config.lora_r > min(widths.values()):
        name = min(widths, key=widths.get)
        raise UserError(f"lora_r {config.lora_r} is larger than {name}'s smallest dimension {widths[name]}, so "
                        f"the adapter is not low-rank: use --lora_r {widths[name]} or less")


def _shape_model(name_or_path: str, trust_remote_code: bool = False):
    """The model's modules and config without its weights."""
    if name_or_path == TINY_RANDOM_LLAMA:
        return build_tiny_model()
    from transformers import AutoConfig

    _check_local_folder(name_or_path, need_weights=True)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0].rstrip(".")
        raise UserError(f"could not read the model config of {name_or_path!r} ({reason}): pass --model_name_or_path a "
                        "local model folder, or a hub id this machine can download") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def default_attention() -> str:
    """FlashAttention 2 on CUDA when installed, else PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def wrap_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05,
              target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> PeftModel:
    """Freeze the base and add LoRA adapters (kept in fp32) to `target_modules`."""
    _check_targets(model, target_modules)
    targets = ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)  # PEFT's own shorthand
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


ALL_LINEAR = "all-linear"  # every Linear layer but the LM head, as PEFT reads it


def _check_targets(model, target_modules) -> None:
    """Every target names a layer of the model that LoRA can adapt (a Linear or Embedding layer)."""
    if list(target_modules) == [ALL_LINEAR]:
        return
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in model.named_modules()}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [m for m in target_modules if m not in kinds]
    if missing:
        raise UserError(f"the model has no module named {', '.join(missing)}: choose lora_target_modules "
                        f"among {', '.join(linear)} (or all-linear)")
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head and n}
    linear = [n for n in linear if n not in head_names]
    unfit = [m for m in target_modules if not issubclass(kinds[m], (torch.nn.Linear, torch.nn.Embedding))]
    if unfit:
        raise UserError(f"{unfit[0]} is a {kinds[unfit[0]].__name__}, which LoRA cannot adapt: choose "
                        f"lora_target_modules among {', '.join(linear)} (or all-linear)")
    on_head = [m for m in target_modules if m in head_names]
    if on_head:  # TRL's SFTTrainer refuses it too, but with a traceback after the model has loaded
        raise UserError(f"{on_head[0]} is the LM head, whose weight TRL's loss reads directly, so a LoRA adapter "
                        f"on it would never train: choose lora_target_modules among {', '.join(linear)} (or all-linear)")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (DeepSpeed ZeRO-3 partitions params)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())


def _check_local_folder(name_or_path: str, need_weights: bool) -> None:
    path = Path(name_or_path)
    if not (path.is_absolute() or name_or_path.startswith(".") or path.exists()):
        check_on_hub(name_or_path)  # a hub id: one line at once when the hub cannot give it
        return
    if not path.is_dir():
        raise UserError(f"model folder {name_or_path} does not exist: check --model_name_or_path")
    if need_weights and not any(path.glob("*.safetensors")):
        raise UserError(f"model folder {name_or_path} has no .safetensors weights: save the model with "
                        "save_pretrained(safe_serialization=True) or pick another folder")
    if not need_weights and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                                     "tokenizer_config.json")):
        raise UserError(f"model folder {name_or_path} has no tokenizer files: save the tokenizer there too")


# --- a tiny random Llama, built offline, for smoke runs and fast tests ---------------------------

@lru_cache(maxsize=1)
def _tiny_tokenizer_files() -> str:
    """A byte-level BPE of 1,000 tokens trained on the bundled sample; deterministic."""
    import json
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for line in Path(SAMPLE_DATA).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["instruction"], row["context"], row["response"]]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts + ["<|user|>\n<|assistant|>\n<|system|>\nContext:\n"], trainer)
    folder = tempfile.mkdtemp(prefix="tiny-random-llama-")
    tokenizer.save(f"{folder}/tokenizer.json")
    return folder


def build_tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=f"{_tiny_tokenizer_files()}/tokenizer.json", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="</s>", chat_template=CHAT_TEMPLATE)
    tokenizer.name_or_path = TINY_RANDOM_LLAMA
    add_bos_to_template(tokenizer)
    return tokenizer


def build_tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random (seeded, hence reproducible) weights on the tiny tokenizer."""
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.name_or_path = TINY_RANDOM_LLAMA
    model.config.name_or_path = TINY_RANDOM_LLAMA
    return model


def is_sharded(model) -> bool:
    """True when parameters are split across processes: FSDP2 DTensors, FSDP1 wrappers, DeepSpeed ZeRO-3."""
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support shards nothing
        return False
    return (any(isinstance(p, DTensor) for p in model.parameters())
            or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()))


def is_model_folder(path: Path) -> bool:
    """A full (e.g. merged) transformers model: a config and safetensors weights, no adapter."""
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))
