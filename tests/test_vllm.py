"""vLLM serves a run folder's LoRA adapter directly (`vllm serve BASE --enable-lora --lora-modules NAME=RUN
--chat-template RUN/chat_template.jinja`, docs/EXPORT.md). vLLM needs a GPU, so it does not run here; these tests
check what it would read against vLLM's own rules, quoted from its source:

* vllm/lora/peft_helper.py, `PEFTHelper._validate_features` / `validate_legal`: "vLLM only supports
  modules_to_save being None.", "vLLM does not yet support DoRA.", "LoRA rank {r} is greater than max_lora_rank
  {max_lora_rank}.", "Adapter bias cannot be used without bias_enabled."; rsLoRA is read (scale alpha / sqrt(r));
  tests/lora/test_peft_helper.py adds a positive rank, no lora_bias, and init_lora_weights among True, False,
  gaussian, eva, orthogonal, mica, lora_ga (PiSSA, OLoRA, CorDA, LoftQ, aLoRA, layer_replication refused);
* vllm/config/lora.py, `LoRAConfig.max_lora_rank: MaxLoRARanks = 16`, one of 1, 8, 16, 32, 64, 128, 256, 320,
  512 (`--max-lora-rank`);
* vllm/model_executor/models/llama.py, `LlamaForCausalLM.packed_modules_mapping` (qkv_proj: q, k, v;
  gate_up_proj: gate, up) and its LoRA modules (qkv_proj, o_proj, gate_up_proj, down_proj, embed_tokens,
  lm_head); vllm/lora/lora_model.py refuses any adapter tensor whose module's last name is not among them
  ("expected target modules in ... but received ...");
* vllm/entrypoints/openai/protocol.py, `ChatCompletionRequest.add_special_tokens = False`: "For most models, the
  chat template takes care of adding the special tokens": the rendered template is tokenized without adding any.

What is proved: our adapter_config.json and adapter tensors pass those rules (a DoRA adapter does not, and the docs
say to serve its merged export), and the chat template file `--chat-template` points at, rendered and tokenized the
way vLLM's chat path does (the template, then the text tokenized without adding special tokens), gives exactly
`encode_prompt`'s ids, which the base model's own template does not. Not proved here: that a given vLLM release
loads it and answers like `generate` (that needs a GPU and vLLM installed)."""

import json
import math
import re

import pytest

from conftest import asset
from tinyllama_ft import encode_prompt, parse_config, to_example
from tinyllama_ft.model.loading import load_tokenizer
from tinyllama_ft.training.sft import setup_model

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "embed_tokens", "lm_head"}  # packed_modules_mapping expanded
VLLM_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica", "lora_ga")
TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?:A|B)\.weight")


def vllm_refusals(folder, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> list[str]:
    """What vLLM's LoRA loader would refuse in a saved adapter folder (its messages, or close to them)."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if config.get("modules_to_save"):
        problems.append("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA.")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if min(ranks) <= 0:
        problems.append("the rank must be a positive integer")
    if max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("Adapter bias cannot be used without bias_enabled.")
    if config.get("init_lora_weights", True) not in VLLM_INITS:
        problems.append(f"init_lora_weights={config['init_lora_weights']!r} is not supported")
    for feature in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if config.get(feature):
            problems.append(f"{feature} is not supported")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        for key in weights.keys():
            match = TENSOR.fullmatch(key)
            if match is None or match["module"].rsplit(".", 1)[-1] not in VLLM_LLAMA_LORA_MODULES:
                problems.append(f"unexpected adapter tensor {key}")
    return problems


def saved_adapter(tmp_path, **settings):
    """The adapter folder `train` writes for these settings (the run's own LoRA wrap, saved as save_run saves it)."""
    config = parse_config(preset="smoke", **settings)
    model = setup_model(config, load_tokenizer(config.model_name_or_path))
    model.save_pretrained(tmp_path, safe_serialization=True, save_embedding_layers=False)
    return tmp_path


def test_the_default_adapter_is_one_vllm_loads(tmp_path):
    folder = saved_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 16 and config["r"] in VLLM_MAX_LORA_RANKS and config["r"] <= VLLM_DEFAULT_MAX_LORA_RANK
    assert vllm_refusals(folder) == []


def test_every_linear_layer_and_rslora_are_loaded_by_vllm_too(tmp_path):
    folder = saved_adapter(tmp_path, lora_target_modules=["all-linear"], use_rslora=True, lora_r=8, lora_alpha=16)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    names = {module.rsplit(".", 1)[-1] for module in config["target_modules"]}  # PEFT writes every layer's path
    assert names == VLLM_LLAMA_LORA_MODULES - {"embed_tokens", "lm_head"}
    assert config["use_rslora"] and vllm_refusals(folder) == []
    assert config["lora_alpha"] / math.sqrt(config["r"]) == pytest.approx(16 / math.sqrt(8))  # vLLM's scale for it


def test_vllm_refuses_dora_and_a_rank_over_its_max_lora_rank(tmp_path):
    refused = vllm_refusals(saved_adapter(tmp_path / "dora", use_dora=True))
    assert refused[0] == "vLLM does not yet support DoRA." and len(refused) == 1 + 8  # and its 8 magnitude vectors
    assert all(problem.endswith(".lora_magnitude_vector") for problem in refused[1:])
    wide = saved_adapter(tmp_path / "r32", lora_r=32, lora_alpha=64)
    assert vllm_refusals(wide) == ["LoRA rank 32 is greater than max_lora_rank 16."]
    assert vllm_refusals(wide, max_lora_rank=32) == []  # `--max-lora-rank 32`, as docs/EXPORT.md says


def test_the_runs_chat_template_file_gives_vllm_encode_prompts_ids(tinyllama_tokenizer, dolly_rows, tmp_path):
    """vLLM's chat path: the template rendered to text (`--chat-template FILE`, else the base tokenizer's), then
    tokenized without special tokens. With the run's chat_template.jinja that is `encode_prompt`'s ids on every
    prompt, a system turn included; with the base TinyLlama template alone the BOS is missing."""
    from transformers import AutoTokenizer

    tinyllama_tokenizer.save_pretrained(tmp_path)  # what a run folder holds
    template = (tmp_path / "chat_template.jinja").read_text(encoding="utf-8")
    base = AutoTokenizer.from_pretrained(str(asset("tinyllama-tokenizer")))  # vLLM's tokenizer: the base model's

    def vllm_ids(messages, chat_template=None):
        text = base.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                        add_generation_prompt=True)
        return base(text, add_special_tokens=False).input_ids

    system = [{"role": "system", "content": "You are a concise assistant."}]
    prompts = [to_example(row)["prompt"] for row in dolly_rows[:200]]
    prompts = [p for p in prompts if "<" not in p[0]["content"]]  # special-token text is refused by encode_prompt
    same = sum(vllm_ids(p, template) == encode_prompt(tinyllama_tokenizer, p) for p in prompts)
    with_system = sum(vllm_ids(system + p, template) == encode_prompt(tinyllama_tokenizer, system + p)
                      for p in prompts[:50])
    assert same == len(prompts) > 150 and with_system == 50
    without = vllm_ids(prompts[0])
    assert without != encode_prompt(tinyllama_tokenizer, prompts[0]) and without[0] != base.bos_token_id
