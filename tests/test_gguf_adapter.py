"""`export --format gguf-adapter`: the base model's GGUF and the run's LoRA adapter as a llama.cpp LoRA GGUF. Proved
in llama.cpp itself (llama-cpp-python's `lora_path`): base + adapter has the merged GGUF's logits and greedy answers
on real Dolly prompts (stories260k fine-tuned with LoRA, `tests/runs.py`), an rsLoRA adapter included (its alpha
rescaled for llama.cpp's alpha / r); without the adapter the answers are the base's. DoRA is refused in one line."""

import json

import pytest
import torch

from conftest import asset
from runs import cli, consumer_prompts, stories_run
from tinyllama_ft import encode_prompt, load_tokenizer
from tinyllama_ft.cli import main as cli_main

NEW_TOKENS = 24


def open_llama(lib, path, lora=None):
    """f32 KV cache (llama.cpp's default f16 cache alone moves stories260k's logits by ~0.03), one thread."""
    return lib.Llama(str(path), lora_path=str(lora) if lora else None, n_ctx=512, logits_all=True, n_threads=1,
                     type_k=0, type_v=0, verbose=False)


def logits_and_greedy(llm, prompts):
    """(each prompt's last-position logits, each prompt's greedy new tokens up to NEW_TOKENS or the EOS)."""
    last, answers = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        last.append(torch.tensor(llm.scores[len(ids) - 1]))
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(out) == NEW_TOKENS:
                break
            out.append(token)
        answers.append(out)
    return torch.stack(last), answers


def exported(tmp_path, run, fmt):
    out = tmp_path / fmt
    cli("export", "--adapter", run, "--out", out, "--format", fmt, "--quantization", "f32")
    return out


def rslora_run(tmp_path):
    """stories260k fine-tuned a few steps with rsLoRA (r 16, alpha 8: PEFT's scale 2, alpha / r would give 0.5)."""
    out = tmp_path / "rslora"
    cli("train", "--model_name_or_path", asset("stories260k"), "--dataset_name", asset("dolly/dolly-sample-1109.jsonl"),
        "--output_dir", out, "--max_length", 512, "--train_size", 64, "--eval_size", 8, "--test_size", 8,
        "--num_generate", 0, "--max_steps", 6, "--gradient_checkpointing", "false", "--per_device_train_batch_size", 8,
        "--gradient_accumulation_steps", 1, "--learning_rate", "3e-3", "--eval_steps", 1000, "--save_steps", 1000,
        "--precision", "fp32", "--lora_r", 16, "--lora_alpha", 8, "--use_rslora", "true")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_base_plus_adapter_in_llama_cpp_answers_like_the_merged_gguf(kind, llama_cpp, tmp_path):
    run = stories_run() if kind == "lora" else rslora_run(tmp_path)
    tokenizer = load_tokenizer(str(run))
    prompts = [encode_prompt(tokenizer, messages) for messages in consumer_prompts()]
    pair, merged = exported(tmp_path, run, "gguf-adapter"), exported(tmp_path, run, "gguf")
    base, adapter = pair / "stories260k-f32.gguf", pair / f"{run.name}-lora-f32.gguf"
    assert sorted(p.name for p in pair.iterdir()) == sorted(["Modelfile", base.name, adapter.name])
    assert "ADAPTER ./" + adapter.name in (pair / "Modelfile").read_text(encoding="utf-8")
    results = {}
    for name, path, lora in (("merged", merged / f"{run.name}-f32.gguf", None), ("adapter", base, adapter),
                             ("base", base, None)):
        llm = open_llama(llama_cpp, path, lora)
        try:
            results[name] = logits_and_greedy(llm, prompts)
        finally:
            llm.close()
    diff = (results["adapter"][0] - results["merged"][0]).abs().max().item()
    change = (results["base"][0] - results["merged"][0]).abs().max().item()
    same = sum(a == b for a, b in zip(results["adapter"][1], results["merged"][1]))
    same_base = sum(a == b for a, b in zip(results["base"][1], results["merged"][1]))
    print(f"{kind}: base + adapter vs merged GGUF in llama.cpp: max |last logit diff| {diff:.2e} (the adapter moves "
          f"them {change:.3f}), greedy {NEW_TOKENS}-token answers identical {same}/{len(prompts)} (base alone "
          f"{same_base}/{len(prompts)})")
    assert diff < 1e-3 < change and same == len(prompts)


def test_a_dora_run_or_a_merged_export_is_refused_in_one_line(tmp_path, capsys):
    from tinyllama_ft.model.loading import build_tiny_model, wrap_lora

    dora = tmp_path / "dora"
    model = wrap_lora(build_tiny_model(), r=4, alpha=8, dropout=0.0, use_dora=True)
    model.save_pretrained(dora)
    (dora / "run_config.json").write_text(json.dumps({"model_name_or_path": "tiny-random-llama"}), encoding="utf-8")
    assert cli_main(["export", "--adapter", str(dora), "--out", str(tmp_path / "out"), "--format", "gguf-adapter"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {dora} is a DoRA adapter, which llama.cpp's LoRA cannot apply: use --format gguf (the adapter merged "
        "into one file)"]
    merged = tmp_path / "merged"
    merged.mkdir()
    build_tiny_model().save_pretrained(merged)
    assert cli_main(["export", "--adapter", str(merged), "--out", str(tmp_path / "out2"),
                     "--format", "gguf-adapter"]) == 2
    assert "holds no LoRA adapter (a merged export)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
