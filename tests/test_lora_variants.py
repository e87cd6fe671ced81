"""PEFT's LoRA variants as settings: DoRA (`--use_dora`) and rsLoRA (`--use_rslora`). The saved adapter carries
them (adapter_config.json, DoRA's magnitude vectors), they define the run (a resume that changes them is
refused), and a DoRA + rsLoRA run trains, loads, generates, merges and exports with the adapter's own logits."""

import json
import math

import pytest
import torch

from conftest import as_printed
from tinyllama_ft import generate, load_saved, parse_config
from tinyllama_ft.cli import main as cli_main
from tinyllama_ft.errors import UserError
from tinyllama_ft.model.loading import build_tiny_model, wrap_lora
from tinyllama_ft.storage.fingerprint import FILE, check_resume, fingerprint

ROWS = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
INSTRUCTION = "Give me three uses of a brick."


def test_the_settings_reach_peft(tmp_path):
    config = parse_config(["--preset", "smoke", "--use_dora", "true", "--use_rslora", "true"])
    assert (config.use_dora, config.use_rslora) == (True, True)
    model = wrap_lora(build_tiny_model(), r=4, alpha=8, dropout=0.0, use_dora=True, use_rslora=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.use_dora["default"] and layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    plain = wrap_lora(build_tiny_model(), r=4, alpha=8, dropout=0.0).base_model.model.model.layers[0].self_attn.q_proj
    assert not plain.use_dora["default"] and plain.scaling["default"] == pytest.approx(8 / 4)


def test_changing_dora_or_rslora_refuses_to_resume_and_a_plain_checkpoint_resumes_as_plain(tmp_path):
    plain = fingerprint(parse_config(preset="smoke"), ROWS)
    dora = fingerprint(parse_config(preset="smoke", use_dora=True, use_rslora=True), ROWS)
    (tmp_path / FILE).write_text(json.dumps(plain), encoding="utf-8")
    with pytest.raises(UserError, match="use_dora false -> true; use_rslora false -> true"):
        check_resume(str(tmp_path), dora)
    unrecorded = {k: v for k, v in plain.items() if k not in ("use_dora", "use_rslora")}  # a checkpoint without them
    (tmp_path / FILE).write_text(json.dumps(unrecorded), encoding="utf-8")
    check_resume(str(tmp_path), plain)
    with pytest.raises(UserError, match="use_dora false -> true"):
        check_resume(str(tmp_path), dora)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "run"
    assert cli_main(["train", "--preset", "smoke", "--output_dir", str(out), "--use_dora", "true",
                     "--use_rslora", "true", "--lora_r", "8", "--lora_alpha", "8"]) == 0
    return out


def ids_of(tokenizer) -> torch.Tensor:
    from tinyllama_ft import encode_prompt

    prompts = ["Give me three uses of a brick.", "What is the capital of France?"]
    return torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": p}])[:12] for p in prompts])


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_the_saved_adapter_carries_dora_and_rslora(dora_run):
    from safetensors import safe_open

    config = json.loads((dora_run / "adapter_config.json").read_text(encoding="utf-8"))
    assert (config["use_dora"], config["use_rslora"], config["r"], config["lora_alpha"]) == (True, True, 8, 8)
    with safe_open(str(dora_run / "adapter_model.safetensors"), "pt") as weights:
        magnitudes = [k for k in weights.keys() if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 2 * 4  # one per adapted layer: q, k, v, o in each of the tiny model's 2 layers
    run_config = json.loads((dora_run / "run_config.json").read_text(encoding="utf-8"))
    assert (run_config["use_dora"], run_config["use_rslora"]) == (True, True)
    assert "| use_dora | True |" in (dora_run / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_dora_adapter_merges_into_the_logits_it_has_and_generates_alike(dora_run, tmp_path, capsys):
    """The merged export (through the command line) has the adapter's logits, and `generate` on the run answers as
    on the merged model; the same adapter read as plain LoRA (DoRA's magnitudes dropped) does not, so the merge
    carries DoRA."""
    from peft import PeftModel

    adapter, tokenizer = load_saved(str(dora_run), device="cpu", dtype=torch.float32)
    ids = ids_of(tokenizer)
    expected = logits(adapter, ids)
    assert cli_main(["export", "--adapter", str(dora_run), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_saved(str(tmp_path / "merged"), device="cpu", dtype=torch.float32)
    assert not isinstance(merged, PeftModel)
    assert (logits(merged, ids) - expected).abs().max().item() < 1e-4
    capsys.readouterr()
    assert cli_main(["generate", "--adapter", str(dora_run), "--instruction", INSTRUCTION, "--max_new_tokens", "12"]) == 0
    answer = generate(merged, tokenizer, INSTRUCTION, max_new_tokens=12, progress=False)
    assert capsys.readouterr().out.strip() == as_printed(answer["text"]) and answer["tokens"] > 0

    plain = tmp_path / "as-plain-lora"
    plain.mkdir()
    config = json.loads((dora_run / "adapter_config.json").read_text(encoding="utf-8"))
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}), encoding="utf-8")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(dora_run / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "lora_magnitude_vector" not in k},
              str(plain / "adapter_model.safetensors"))
    base = build_tiny_model()
    without = PeftModel.from_pretrained(base, str(plain)).eval()
    assert (logits(without, ids) - expected).abs().max().item() > 1e-3


@pytest.mark.slow
def test_a_dora_adapter_exports_a_gguf_with_its_logits(dora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, tokenizer = load_saved(str(dora_run), device="cpu", dtype=torch.float32)
    ids = ids_of(tokenizer)
    assert cli_main(["export", "--adapter", str(dora_run), "--out", str(tmp_path / "gguf"), "--format", "gguf",
                     "--quantization", "f32"]) == 0
    path = tmp_path / "gguf" / "run-f32.gguf"
    gguf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert (logits(gguf, ids) - logits(adapter, ids)).abs().max().item() < 1e-4

