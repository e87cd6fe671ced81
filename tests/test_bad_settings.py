"""Bad settings, each given the four ways a user gives one: a flag, a line of a YAML file, a notebook
`TINYLLAMA_FT_*` variable and a Python keyword. Each is refused by the same declared rule, in one line
that starts with the value as the user wrote it (so it names the setting and its source) and says what
is wrong and what to pass. In-process and fast: the configuration is all these touch."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from tinyllama_ft.cli import main
from tinyllama_ft.settings.config import notebook_config, parse_config
from tinyllama_ft.errors import UserError

BASE = ["--preset", "smoke", "--output_dir", "runs/never-written"]

# (field, the value as typed on a command line or in a variable, the same value in YAML / Python, words)
CASES = [
    ("learning_rate", "nan", float("nan"), "must be a finite number"),
    ("learning_rate", "inf", float("inf"), "must be a finite number"),
    ("learning_rate", "-inf", float("-inf"), "must be a finite number"),
    ("learning_rate", "-1", -1, "learning_rate must be > 0"),
    ("learning_rate", "fast", "fast", "must be a number"),
    ("lora_r", "8.5", 8.5, "must be a whole number"),
    ("lora_r", "0", 0, "lora_r must be > 0"),
    ("lora_r", "-3", -3, "lora_r must be > 0"),
    ("lora_alpha", "1e309", float("inf"), "must be a finite number"),
    ("lora_dropout", "1.5", 1.5, "lora_dropout must be in [0, 1)"),
    ("lora_dropout", "nan", float("nan"), "must be a finite number"),
    ("num_train_epochs", "nan", float("nan"), "must be a finite number"),
    ("warmup_steps", "-1", -1, "warmup_steps must be >= 0"),
    ("warmup_steps", "inf", float("inf"), "must be a finite number"),
    ("max_grad_norm", "nan", float("nan"), "must be a finite number"),
    ("max_grad_norm", "-1", -1, "max_grad_norm must be >= 0"),
    ("weight_decay", "-0.1", -0.1, "weight_decay must be >= 0"),
    ("adam_beta1", "1", 1, "adam_beta1 must be in [0, 1)"),
    ("adam_epsilon", "0", 0, "adam_epsilon must be > 0"),
    ("seed", "-1", -1, "seed must be in [0, 4294967295]"),
    ("seed", "99999999999", 99999999999, "seed must be in [0, 4294967295]"),
    ("max_length", "8", 8, "max_length must be >= 16"),
    ("train_size", "0", 0, "train_size must be > 0"),
    ("eval_size", "-1", -1, "eval_size must be >= 0"),
    ("per_device_train_batch_size", "0.5", 0.5, "must be a whole number"),
    ("gradient_accumulation_steps", "many", "many", "must be a whole number"),
    ("save_steps", "nan", float("nan"), "must be a finite number"),
    ("logging_steps", "inf", float("inf"), "must be a finite number"),
    ("eval_steps", "-2", -2, "eval_steps must be > 0"),
    ("save_total_limit", "-1", -1, "save_total_limit must be >= 0"),
    ("max_new_tokens", "0", 0, "max_new_tokens must be > 0"),
    ("num_generate", "-1", -1, "num_generate must be >= 0"),
    ("label_smoothing_factor", "1", 1, "label_smoothing_factor must be in [0, 1)"),
    ("dataloader_num_workers", "-1", -1, "dataloader_num_workers must be >= 0"),
    ("max_steps", "1.5", 1.5, "must be a whole number"),
    ("max_steps", "-5", -5, "max_steps must be > 0, or -1"),
    ("gradient_checkpointing", "maybe", "maybe", "must be auto, true or false"),
    ("load_in_4bit", "2", 2, "must be true or false"),
    ("precision", "fp8", "fp8", "must be one of auto, bf16, fp16, fp32"),
    ("dataset_format", "csv", "csv", "must be one of auto, dolly, alpaca, messages, prompt_completion"),
    ("lora_target_modules", ",", [], "lora_target_modules must name at least one"),
]
# Values only a YAML file or Python can hold: a list for a number, a mapping, a number for names...
TYPED_CASES = [
    ("lora_r", [8], "must be a whole number, not a list"),
    ("learning_rate", {"peak": 1e-3}, "must be a number, not a dict"),
    ("lora_target_modules", [1, 2], "must be names (text), one or several"),
    ("lora_target_modules", 5, "must be names (text), one or several"),
    ("system_prompt", ["Be brief."], "must be text, not a list"),
    ("gradient_checkpointing", [True], "not a list"),
    ("train_size", True, "must be a whole number, not a bool"),
    ("lora_r", None, "must be set"),
]


def where(field, text, source, path=None):
    return {"flag": f"--{field} {text}", "variable": f"TINYLLAMA_FT_{field.upper()}={text}",
            "keyword": f"{field}={text}", "file": f"{field}: {text} in {path}"}[source]


def refusal(build) -> str:
    with pytest.raises(UserError) as refused:
        build()
    message = str(refused.value)
    assert "\n" not in message and message.strip() == message, message
    return message


@pytest.mark.parametrize("field, text, value, words", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_a_flag(field, text, value, words, capsys):
    assert main(["config", *BASE, f"--{field}={text}"]) == 2  # (`--name=VALUE`: argparse reads -inf as a flag)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {where(field, text, 'flag')}: ") and words in err[0], err


@pytest.mark.parametrize("field, text, value, words", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_a_notebook_variable(field, text, value, words):
    environ = {"TINYLLAMA_FT_PRESET": "smoke", f"TINYLLAMA_FT_{field.upper()}": text}
    message = refusal(lambda: notebook_config({}, environ))
    assert message.startswith(where(field, text, "variable") + ": ") and words in message, message


@pytest.mark.parametrize("field, text, value, words", CASES + [(f, repr(v), v, w) for f, v, w in TYPED_CASES],
                         ids=[f"{c[0]}={c[1]}" for c in CASES] + [f"{f}={v!r}" for f, v, _ in TYPED_CASES])
def test_a_line_of_a_yaml_file(field, text, value, words, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({field: value}), encoding="utf-8")
    message = refusal(lambda: parse_config([*BASE, "--config", str(path)]))
    assert message.startswith(f"{field}: ") and f" in {path}: " in message and words in message, message


@pytest.mark.parametrize("field, value, words", [(f, v, w) for f, _, v, w in CASES] + TYPED_CASES,
                         ids=[f"{c[0]}={c[1]}" for c in CASES] + [f"{f}={v!r}" for f, v, _ in TYPED_CASES])
def test_a_python_keyword(field, value, words):
    message = refusal(lambda: parse_config(BASE, **{field: value}))
    assert message.startswith(f"{field}=") and words in message, message


def test_a_yaml_file_converts_values_as_a_flag_would(tmp_path):
    """`lora_r: 8.0` is 8, one module name is a list of one, numbers written as text are numbers."""
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 8.0\nlora_target_modules: q_proj\nlearning_rate: '3e-4'\nsave_total_limit: none\n"
                    "gradient_checkpointing: 'false'\n", encoding="utf-8")
    config = parse_config([*BASE, "--config", str(path)])
    assert (config.lora_r, config.lora_target_modules, config.learning_rate) == (8, ["q_proj"], 3e-4)
    assert config.save_total_limit is None and config.gradient_checkpointing is False
    assert parse_config([*BASE, "--lora_target_modules", "q_proj,v_proj"]).lora_target_modules == ["q_proj", "v_proj"]
    environ = {"TINYLLAMA_FT_PRESET": "smoke", "TINYLLAMA_FT_LORA_TARGET_MODULES": "q_proj v_proj"}
    assert notebook_config({}, environ).lora_target_modules == ["q_proj", "v_proj"]


def test_fp16_and_bf16_are_honoured_as_precision_or_refused_never_dropped():
    message = refusal(lambda: parse_config(["--output_dir", "runs/x", "--fp16", "true"]))
    assert message.startswith("--fp16 true: fp16 needs a CUDA GPU"), message  # CPU here; on a GPU: precision fp16
    assert parse_config(["--output_dir", "runs/x", "--bf16", "true", "--use_cpu", "true"]).precision == "bf16"  # bf16 runs on the CPU too
    if not torch.cuda.is_available():  # and without --use_cpu: on a CPU-only machine bf16 names the CPU itself
        for flags in (["--bf16", "true"], ["--precision", "bf16"]):
            config = parse_config(["--output_dir", "runs/x", *flags])
            assert config.precision == "bf16" and config.use_cpu and config.bf16
    for flag in ("fp16", "bf16"):
        message = refusal(lambda: parse_config([*BASE, f"--{flag}", "true"]))  # smoke says precision fp32
        assert f"contradicts precision=fp32" in message, message
    assert "fp16 and bf16 are both true" in refusal(lambda: parse_config(["--fp16", "true", "--bf16", "true"]))
    assert parse_config([*BASE, "--fp16", "false"]).precision == "fp32"


UNKNOWN = [
    (lambda tmp: main(["config", "--lora_rank", "8"]), "unrecognized arguments: --lora_rank 8 (did you mean lora_r?)"),
    (lambda tmp: parse_config(lora_rank=8), "unknown configuration field 'lora_rank' (did you mean lora_r?)"),
    (lambda tmp: notebook_config({}, {"TINYLLAMA_FT_LORA_RANK": "8"}),
     "unknown configuration field TINYLLAMA_FT_LORA_RANK (did you mean lora_r?)"),
    (lambda tmp: (tmp / "u.yaml").write_text("lora_rank: 8\n", encoding="utf-8") and parse_config(["--config", str(tmp / "u.yaml")]),
     "unknown configuration field 'lora_rank' in"),
    (lambda tmp: (tmp / "e.yaml").write_text("env: 5\n", encoding="utf-8") and parse_config(["--config", str(tmp / "e.yaml")]),
     "`env:` must be a mapping"),
    (lambda tmp: parse_config(["--config", str(tmp)]), "is a folder: pass a YAML file"),
    (lambda tmp: parse_config([*BASE, "--columns", "instruction"]), "is not NAME=COLUMN"),
    (lambda tmp: parse_config([*BASE, "--lr_scheduler_type", "bogus"]), "transformers/TRL refuse this configuration"),
    (lambda tmp: parse_config(["--preset", "nope"]), "--preset nope: is not a preset (presets: smoke)"),
    (lambda tmp: (tmp / "p.yaml").write_text("preset: nope\n", encoding="utf-8") and parse_config(["--config", str(tmp / "p.yaml")]),
     "preset: nope in"),
    (lambda tmp: notebook_config({}, {"TINYLLAMA_FT_PRESET": "nope"}), "TINYLLAMA_FT_PRESET=nope: is not a preset"),
    (lambda tmp: parse_config(BASE, output_dir="  "), "is not a folder name: pass output_dir=runs/my-run"),
]


@pytest.mark.parametrize("call, words", UNKNOWN, ids=[w[:30] for _, w in UNKNOWN])
def test_unknown_names_and_files_that_are_not_settings(call, words, tmp_path, capsys):
    try:
        result = call(tmp_path)
    except UserError as error:
        message = str(error)
    else:
        assert result == 2
        message = capsys.readouterr().err.strip()
    assert "\n" not in message and words in message, message


def test_the_notebook_parameters_cell_is_checked_like_the_rest():
    message = refusal(lambda: notebook_config({"preset": "smoke", "lora_r": 8.5}, {}))
    assert message == "lora_r = 8.5 in the notebook's parameters cell: must be a whole number: pass lora_r=16"


@pytest.mark.parametrize("field, text", [("learning_rate", "nan"), ("lora_r", "8.5"), ("fp16", "true")])
def test_the_shell_sees_one_line_through_the_real_command_line(field, text):
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", "train", *BASE, f"--{field}", text], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --{field} {text}: "), result.stderr


# --- every command's settings, by the same rules: dpo, generate, chat (and train's own step count) -----------

DPO = ["--preset", "smoke"]
COMMAND_CASES = [  # (arguments after `python -m tinyllama_ft`, words of the one line)
    (["dpo", *DPO, "--loss_type", "bogus"], "--loss_type bogus: bogus is not one of sigmoid, hinge, ipo"),
    (["dpo", *DPO, "--loss_type", "sigmoid", "nope"], "nope is not one of sigmoid"),
    (["dpo", *DPO, "--learning_rate=nan"], "--learning_rate nan: must be a finite number"),
    (["dpo", *DPO, "--beta=nan"], "--beta nan: must be a finite number"),
    (["dpo", *DPO, "--beta=inf"], "--beta inf: must be a finite number"),
    (["dpo", *DPO, "--beta", "0"], "--beta 0: beta must be > 0"),
    (["dpo", *DPO, "--label_smoothing", "0.7"], "--label_smoothing 0.7: label_smoothing must be in [0, 0.5): pass "
     "--label_smoothing 0.0"),
    (["dpo", *DPO, "--label_smoothing=-0.1"], "label_smoothing must be in [0, 0.5)"),
    (["dpo", *DPO, "--loss_type", "exo_pair"], "the exo_pair loss needs label_smoothing > 0"),
    (["dpo", *DPO, "--loss_type", "apo_zero", "--f_divergence_type", "js_divergence"], "applies only to the losses"),
    (["dpo", *DPO, "--f_divergence_type", "kl"], "--f_divergence_type kl: must be one of reverse_kl"),
    (["dpo", *DPO, "--max_length", "8"], "max_length must be >= 16"),
    (["dpo", *DPO, "--train_size", "2.5"], "--train_size 2.5: must be a whole number"),
    (["dpo", *DPO, "--gradient_accumulation_steps", "13"], "is more than the 12 micro-batches an epoch has"),
    (["dpo", *DPO, "--Learning_Rate", "1e-3"], "--Learning_Rate 1e-3 (did you mean learning_rate?); see "
     "`python -m tinyllama_ft dpo --help`"),
    (["dpo", *DPO, "--preset", "huge"], "--preset huge: is not a preset (presets: smoke)"),
    (["train", *BASE, "--gradient_accumulation_steps", "13"], "--gradient_accumulation_steps 13: is more than the 12 "
     "micro-batches an epoch has (train_size 24 rows / per_device_train_batch_size 2)"),
    (["generate", "--adapter", "runs/none", "--instruction", "Hi.", "--max_new_tokens", "nan"],
     "--max_new_tokens nan: must be a finite number"),
    (["generate", "--adapter", "runs/none", "--instruction", "Hi.", "--max_new_tokens", "8.5"],
     "must be a whole number"),
    (["chat", "--adapter", "runs/none", "--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["chat", "--adapter", "runs/none", "--temperature=-1"], "--temperature -1: temperature must be in [0, 2]"),
    (["chat", "--adapter", "runs/none", "--top_p", "0"], "--top_p 0: top_p must be in (0, 1]"),
    (["chat", "--adapter", "runs/none", "--top_p", "inf"], "--top_p inf: must be a finite number"),
    (["chat", "--adapter", "runs/none", "--max_new_tokens", "0"], "--max_new_tokens 0: max_new_tokens must be > 0"),
    (["chat", "--adapter", "runs/none", "--Temperature", "0.5"], "--Temperature 0.5 (did you mean --temperature?)"),
    (["generate", "--adapter", "runs/none", "--instruction", "Hi.", "--max_tokens", "5"],
     "--max_tokens 5 (did you mean --max_new_tokens?)"),
]


@pytest.mark.parametrize("args, words", COMMAND_CASES, ids=[" ".join(a[:1] + a[-2:])[:40] for a, _ in COMMAND_CASES])
def test_every_command_checks_its_settings_by_the_same_rules(args, words, tmp_path, capsys, monkeypatch):
    """rc 2, one line, before anything is loaded or written (no output folder, no model: `runs/none` is absent)."""
    monkeypatch.chdir(tmp_path)
    out = ["--output_dir", str(tmp_path / "out")] if args[0] in ("dpo", "train") else []
    assert main([*args, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def alias_bomb(levels=9) -> str:
    """A few hundred bytes of YAML that stand for 9**9 (387 million) values."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + f"\nseed: *a{levels - 1}\n"


YAML_CASES = [  # (file text, words of the one line; {path} is the file)
    ("seed: 1\nlearning_rate: 0.001\nseed: 2\n",
     "--config {path}: key 'seed' is given twice (lines 1 and 3): keep one"),
    (alias_bomb(), "--config {path}: its aliases expand to more than 10,000 values"),
    ("seed: " + "9" * 5000 + "\n", "--config {path} holds a value Python cannot read"),
    ("seed: " + "[" * 3000 + "]" * 3000 + "\n", "--config {path} nests its values too deep to read"),
    ("Learning_Rate: 0.001\n", "unknown configuration field 'Learning_Rate' in {path} (did you mean learning_rate?)"),
    ("seed: [" + ", ".join(map(str, range(5000))) + "]\n", "seed: a list of 5000 items in {path}: must be a whole "
     "number, not a list"),
    ("seed: " + "x" * 100_000 + "\n", "seed: " + "x" * 60 + "... in {path}: must be a whole number"),
]


@pytest.mark.parametrize("command", [["config", *BASE], ["dpo", *DPO]], ids=["config", "dpo"])
@pytest.mark.parametrize("text, words", YAML_CASES, ids=["duplicate", "alias bomb", "huge int", "deep", "case",
                                                        "long list", "long text"])
def test_a_yaml_file_is_read_safely_under_every_command(command, text, words, tmp_path, capsys):
    """Duplicate keys, alias bombs, values too big to read: one bounded line, in our words, under train's and
    dpo's door alike, with little memory (the alias bomb's 387 million values are never built or printed)."""
    import tracemalloc

    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    tracemalloc.start()
    try:
        assert main([*command, "--output_dir", str(tmp_path / "out"), f"--config={path}"]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words.format(path=path) in err[0] and len(err[0]) < 400 + len(str(path)), err[0][:500]
    assert peak < 100 * 2**20 and not (tmp_path / "out").exists(), peak


def test_config_equals_file_is_read_like_config_space_file(tmp_path):
    from tinyllama_ft.training.dpo import parse_dpo_config

    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.003\n", encoding="utf-8")
    assert parse_config([*BASE, f"--config={path}"]).learning_rate == 0.003
    path.write_text("beta: 0.2\n", encoding="utf-8")
    assert parse_dpo_config([*DPO, f"--config={path}"]).beta == parse_dpo_config([*DPO, "--config", str(path)]).beta \
        == 0.2


def test_dpo_choices_are_trl_s_own():
    """The loss types and f-divergences dpo accepts are those the installed TRL's DPOConfig documents and its
    DPOTrainer computes; label_smoothing's range is the one its help states (an assumption about TRL, named)."""
    import inspect

    from trl import DPOConfig
    from trl.trainer import dpo_trainer

    from tinyllama_ft.training.dpo import DPO_LOSS_TYPES, F_DIVERGENCE_LOSSES, F_DIVERGENCES

    fields = {f.name: f for f in dataclasses.fields(DPOConfig)}
    documented = re.findall(r"`'(\w+)'`", fields["loss_type"].metadata["help"])
    computed = re.findall(r'loss_type == "(\w+)"', inspect.getsource(dpo_trainer.DPOTrainer))
    assert list(DPO_LOSS_TYPES) == documented and set(DPO_LOSS_TYPES) == set(computed)
    assert list(F_DIVERGENCES) == re.findall(r"`(\w+)`", fields["f_divergence_type"].metadata["help"])[:4]
    assert set(F_DIVERGENCE_LOSSES) < set(DPO_LOSS_TYPES)
    assert "must lie in [0.0, 0.5)" in fields["label_smoothing"].metadata["help"]


@pytest.mark.parametrize("args", [["dpo", *DPO, "--output_dir", "runs/never", "--loss_type", "bogus"],
                                  ["dpo", *DPO, "--output_dir", "runs/never", "--beta", "nan"]])
def test_dpo_refusals_reach_the_shell_as_one_line(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, \
        result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
