"""The command line contract: config, preview, the smoke preset end to end, generate, export, errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, as_printed

REQUIRED_METRICS = {"base_eval_loss", "eval_loss", "base_eval_perplexity", "eval_perplexity", "train_loss",
                    "train_runtime", "train_tokens_per_second", "rouge1", "rouge2", "rougeL", "bleu", "eos_rate",
                    "base_rougeL", "base_eos_rate", "world_size"}


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def test_config_prints_the_resolved_seed_configuration():
    """Every value that decides what is learned is the seed's; checkpoint cadence is operational: a
    checkpoint every tenth of the run (the seed's 500 steps never came in its 313-step run), two kept."""
    config = json.loads(cli("config").stdout)
    expected = dict(model_name_or_path="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                    dataset_name="databricks/databricks-dolly-15k", train_size=5000, eval_size=500, test_size=500,
                    max_length=1024, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], per_device_train_batch_size=2,
                    gradient_accumulation_steps=8, learning_rate=2e-4, num_train_epochs=1.0,
                    lr_scheduler_type="cosine", warmup_steps=0.03, gradient_checkpointing="auto",
                    logging_steps=50, eval_steps=100, seed=42, num_generate=200, precision="fp32",
                    save_steps=0.1, save_total_limit=2)
    assert {k: config[k] for k in expected} == expected
    assert json.loads(cli("config", "--save_steps", 500).stdout)["save_steps"] == 500  # the seed's, one flag away


def test_config_help_lists_every_field():
    """The README sends users to `config --help`; argparse %-formats help texts, so a stray % breaks it."""
    import dataclasses

    from tinyllama_ft.settings.config import Config

    help_text = cli("config", "--help").stdout
    own = [f.name for f in dataclasses.fields(Config) if f.name not in {f.name for f in dataclasses.fields(
        Config.__mro__[1])}]
    assert own and all(f"--{name}" in help_text for name in own), [n for n in own if f"--{n}" not in help_text]


def test_config_layers_yaml_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1.0e-4\nlora_r: 8\npreset: smoke\n", encoding="utf-8")
    config = json.loads(cli("config", "--config", tmp_path / "c.yaml", "--lora_r", 4).stdout)
    assert (config["learning_rate"], config["lora_r"], config["train_size"]) == (1e-4, 4, 24)


def test_preview_writes_what_the_trainer_is_fed(tinyllama_tokenizer, dolly_path, tmp_path):
    out = tmp_path / "p.jsonl"
    cli("preview", "--model_name_or_path", tinyllama_tokenizer.name_or_path, "--dataset_name", dolly_path,
        "--n", 5, "--out", out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2, 3, 4]
    for line in lines:
        assert len(line["input_ids"]) == len(line["labels"]) and line["labels"][-1] == 2
        assert line["labels"][0] == -100


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    trained = cli("train", "--preset", "smoke", "--output_dir", out)
    assert "ContinuousBatching" not in trained.stderr  # transformers' set-up chatter (22 lines a run before)
    assert "'pin_memory' argument is set as true" not in trained.stderr  # torch's warning without a GPU
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert REQUIRED_METRICS <= set(metrics)
    assert set(json.loads((out / "split.json").read_text(encoding="utf-8"))) == {"train", "validation", "test"}
    from tinyllama_ft import generate, load_for_inference

    printed = cli("generate", "--adapter", out, "--instruction", "Name a color.", "--max_new_tokens", 8).stdout
    model, tokenizer = load_for_inference(str(out), device="cpu")
    assert printed == as_printed(generate(model, tokenizer, "Name a color.", max_new_tokens=8)["text"]) + "\n"
    env_without_token = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    exported = subprocess.run([sys.executable, "-m", "tinyllama_ft", "export", "--adapter", str(out), "--out",
                               str(tmp_path / "merged"), "--push_to_hub", "someone/tiny"], cwd=ROOT,
                              capture_output=True, text=True, env=env_without_token | {"HF_HOME": str(tmp_path)})
    assert exported.returncode == 0 and "push skipped: no hub token" in exported.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    again = cli("train", "--preset", "smoke", "--output_dir", out, check=False)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "nope"], "is not a preset (presets: smoke)"),
    (["train", "--lora_r", "0"], "lora_r must be > 0"),
    (["train", "--learning_rate", "-1"], "learning_rate must be > 0"),
    (["train", "--no_such_field", "1"], "unrecognized arguments: --no_such_field 1"),
    (["train", "--precision", "fp16"], "needs a CUDA GPU"),
    (["train", "--preset", "smoke", "--dataset_name", "missing.jsonl"], "does not exist"),
    (["train", "--preset", "smoke", "--train_size", "100"], "has only 48 rows"),
    (["train", "--preset", "smoke", "--lora_target_modules", "c_attn"], "no module named c_attn"),
    (["generate", "--adapter", "nowhere", "--instruction", "hi"], "--adapter nowhere does not exist"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    from tinyllama_ft.cli import main

    if args[0] == "train":
        args = [*args, "--output_dir", str(tmp_path / "o")]
    assert main(args) == 2
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("error:") and message in last


def test_errors_exit_non_zero_without_traceback_from_the_shell():
    result = cli("train", "--lora_r", "-3", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --lora_r -3: lora_r must be > 0: pass --lora_r 16"
    assert "Traceback" in cli("train", "--lora_r", "-3", "--debug", check=False).stderr


def test_a_model_the_hub_cannot_give_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch):
    """The README's first command on a machine without the hub (or with a mistyped id): one line, before any data."""
    from tinyllama_ft.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--model_name_or_path", "nobody/no-such-model", "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not read the model config of 'nobody/no-such-model' (")
    assert err[0].endswith("): pass --model_name_or_path a local model folder, or a hub id this machine can download")
    assert not (tmp_path / "r").exists()
