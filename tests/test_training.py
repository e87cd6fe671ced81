"""The real pretrained stories260k, fine-tuned through the same stage functions the notebook and
`train` use: held-out loss drops, only adapters change, save -> reload and merge keep the logits."""

import json

import pytest
import torch

from tinyllama_ft import (build_trainer, evaluate_base, evaluate_model, export_merged, fit, load_for_inference,
                          load_tokenizer, parse_config, prepare_data, save_run, setup_model, summarize)
from tinyllama_ft.evaluation.dolly import pad_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(stories_dir, dolly_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "run"
    config = parse_config(
        model_name_or_path=stories_dir, dataset_name=dolly_path, output_dir=str(out), max_length=512,
        train_size=240, eval_size=64, test_size=32, num_generate=8, max_new_tokens=24, max_steps=30,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, logging_steps=10,
        eval_steps=15, save_steps=1000, gradient_checkpointing=True, precision="fp32", lora_r=8, lora_alpha=16)
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    model = setup_model(config, tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = build_trainer(config, model, tokenizer, data)
    base = evaluate_base(config, model, tokenizer, data)
    train_metrics = fit(trainer)
    tuned = evaluate_model(config, model, tokenizer, data)
    metrics = summarize(base, tuned, train_metrics, model, data, config)
    save_run(config, model, tokenizer, metrics, data.split, trainer.state.log_history, generations={})
    return dict(config=config, tokenizer=tokenizer, data=data, model=model, before=before, metrics=metrics, out=out)


def test_fine_tuning_lowers_held_out_loss(run):
    m = run["metrics"]
    print(f"stories260k held-out loss: base {m['base_eval_loss']:.4f} -> tuned {m['eval_loss']:.4f}")
    assert m["eval_tokens"] == m["base_eval_tokens"] > 1000
    assert m["eval_loss"] < m["base_eval_loss"] - 0.1
    assert m["eval_perplexity"] == pytest.approx(torch.tensor(m["eval_loss"]).exp().item())
    assert m["train_steps"] == 30 and m["train_tokens_per_second"] > 0


def test_only_adapter_weights_change(run):
    after = dict(run["model"].named_parameters())
    changed = {name for name, before in run["before"].items() if not torch.equal(before, after[name])}
    trainable = {name for name, p in after.items() if p.requires_grad}
    assert changed and changed <= trainable and all("lora_B" in n for n in trainable if n in changed and "lora_B" in n)
    assert all("lora_" in name for name in trainable)
    assert {n for n in changed if "lora_B" in n}, "lora_B starts at zero and must have moved"
    assert all(p.dtype == torch.float32 for p in after.values() if p.requires_grad)


def test_output_folder_holds_everything_inference_needs(run):
    out = run["out"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja",
                 "run_config.json", "metrics.json", "split.json", "log_history.json"):
        assert (out / name).is_file(), name
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert split == run["data"].split and set(split) == {"train", "validation", "test"}
    assert json.loads((out / "run_config.json").read_text(encoding="utf-8"))["lora_r"] == 8
    assert any("eval_loss" in entry for entry in json.loads((out / "log_history.json").read_text(encoding="utf-8")))


def _logits(model, examples, pad_id):
    batch = pad_batch(examples, pad_id, "cpu")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_reload_gives_identical_logits(run):
    examples = run["data"].examples("validation")[:4]
    pad = run["tokenizer"].pad_token_id
    model, tokenizer = load_for_inference(str(run["out"]), device="cpu")
    assert tokenizer.chat_template == run["tokenizer"].chat_template
    torch.testing.assert_close(_logits(model, examples, pad), _logits(run["model"].eval(), examples, pad),
                               rtol=0, atol=0)


def test_merged_export_gives_the_same_logits(run, tmp_path):
    from transformers import AutoModelForCausalLM

    merged_dir = export_merged(str(run["out"]), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    examples = run["data"].examples("validation")[:4]
    pad = run["tokenizer"].pad_token_id
    torch.testing.assert_close(_logits(merged, examples, pad), _logits(run["model"].eval(), examples, pad),
                               rtol=1e-4, atol=1e-4)
    assert merged.generation_config.eos_token_id == run["tokenizer"].eos_token_id
    assert not any("lora" in name for name, _ in merged.named_parameters())
