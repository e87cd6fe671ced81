"""LoRA wrapping at TinyLlama's exact shape (meta device, no weights) and on the tiny model."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import asset
from tinyllama_ft.errors import UserError
from tinyllama_ft.model.loading import build_tiny_model, count_parameters, wrap_lora


def test_trainable_parameters_at_tinyllama_shape():
    config = AutoConfig.from_pretrained(asset("tinyllama-1.1b-config"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    trainable, total = count_parameters(wrap_lora(model, r=16, alpha=32, dropout=0.05))
    # per layer: q (2048+2048)*16 + k (2048+256)*16 + v (2048+256)*16 + o (2048+2048)*16 = 204,800; 22 layers
    assert trainable == 4_505_600
    assert total - trainable == 1_100_048_384


def test_lora_adapters_are_fp32_on_a_bf16_base():
    model = wrap_lora(build_tiny_model().to(torch.bfloat16))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_unknown_target_modules_name_the_choices():
    with pytest.raises(UserError, match="no module named c_attn.*q_proj"):
        wrap_lora(build_tiny_model(), target_modules=["q_proj", "c_attn"])


def test_tiny_random_model_is_reproducible():
    a, b = build_tiny_model(), build_tiny_model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
