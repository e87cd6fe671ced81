"""Honest resume: a checkpoint carries what defines its run (`run_fingerprint.json`); resuming with a
setting that would make another run is refused in one line naming every change, before the model loads;
changes that cannot alter what is learned are allowed, take effect, and are what run_config.json records.
Damaged checkpoints are one line naming the file."""

import importlib
import json
import re
import shutil
import signal

import pytest

from test_reliability import RUN, stop_at, train as train_cli
from tinyllama_ft import parse_config, train
from tinyllama_ft.errors import UserError

RESUME = ["--resume_from_checkpoint", "true"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped (SIGKILL) after its checkpoint at step 4 of 8."""
    tmp = tmp_path_factory.mktemp("stopped")
    out = tmp / "run"
    stop_at("checkpoint-4", signal.SIGKILL, out, tmp)
    rows = [json.loads(line) for line in open(parse_config(RUN).dataset_name, encoding="utf-8")]
    (tmp / "other.jsonl").write_text("".join(json.dumps(dict(r, response=r["response"] + " Indeed.")) + "\n"
                                             for r in rows), encoding="utf-8")
    return out


REFUSED = [  # (flags added to the resuming command, the change the refusal names)
    (["--lora_r", "8"], "lora_r 16 -> 8"),
    (["--lora_alpha", "16"], "lora_alpha 32 -> 16"),
    (["--lora_dropout", "0.1"], "lora_dropout 0.05 -> 0.1"),
    (["--lora_target_modules", "q_proj,v_proj"], 'lora_target_modules ["q_proj", "k_proj", "v_proj", "o_proj"] -> ["q_proj", "v_proj"]'),
    (["--learning_rate", "2e-3"], "learning_rate 0.001 -> 0.002"),
    (["--lr_scheduler_type", "linear"], "lr_scheduler_type cosine -> linear"),
    (["--warmup_steps", "2"], "warmup_steps 0.03 -> 2"),
    (["--seed", "7"], "seed 42 -> 7"),
    (["--max_steps", "10"], "max_steps 8 -> 10"),
    (["--per_device_train_batch_size", "4"], "per_device_train_batch_size 2 -> 4"),
    (["--gradient_accumulation_steps", "1"], "gradient_accumulation_steps 2 -> 1"),
    (["--weight_decay", "0.1"], "weight_decay 0.0 -> 0.1"),
    (["--max_grad_norm", "0.5"], "max_grad_norm 1.0 -> 0.5"),
    (["--optim", "adamw_torch"], "optim adamw_torch_fused -> adamw_torch"),
    (["--system_prompt", "Be brief."], "system_prompt null -> Be brief."),
    (["--train_size", "20"], "train_size 24 -> 20"),
    (["--max_length", "200"], "max_length 256 -> 200"),
    (["--dataset_name", "{tmp}/other.jsonl"], "hence the training rows"),
    (["--lora_r", "8", "--learning_rate", "2e-3"], "lora_r 16 -> 8; learning_rate 0.001 -> 0.002"),  # every change
]
ALLOWED = [["--logging_steps", "3"], ["--eval_steps", "2"], ["--save_steps", "4"], ["--save_total_limit", "5"],
           ["--max_new_tokens", "8"], ["--per_device_eval_batch_size", "2"], ["--gradient_checkpointing", "true"],
           ["--lm_head_labelled_only", "false"], ["--tokenization_cache", "false"], ["--report_to", "none"]]


class ModelLoads(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    def loads(*args, **kwargs):
        raise ModelLoads

    monkeypatch.setattr(importlib.import_module("tinyllama_ft.training.sft"), "load_model", loads)


@pytest.mark.slow
@pytest.mark.parametrize("flags, change", REFUSED, ids=[" ".join(f)[:40] for f, _ in REFUSED])
def test_a_resume_that_would_make_another_run_is_refused_naming_every_change(flags, change, stopped, no_model):
    flags = [f.format(tmp=stopped.parent) for f in flags]
    with pytest.raises(UserError, match=re.escape(change)) as refused:
        train(parse_config(RUN + ["--output_dir", str(stopped), *RESUME, *flags]))
    assert str(refused.value).startswith("checkpoint-4 is another run than this command's: ")
    assert str(refused.value).endswith("--overwrite_output_dir true") and "\n" not in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("flags", ALLOWED, ids=[" ".join(f) for f in ALLOWED])
def test_a_resume_with_a_harmless_change_goes_on_to_load_the_model(flags, stopped, no_model):
    with pytest.raises(ModelLoads):
        train(parse_config(RUN + ["--output_dir", str(stopped), *RESUME, *flags]))


@pytest.mark.slow
def test_a_harmless_change_takes_effect_and_run_config_records_it(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    err = train_cli(out, *RESUME, "--logging_steps", "3")
    assert "resumed with logging_steps 3 (the checkpoint had 1)" in err and "do not match" not in err
    assert json.loads((out / "run_config.json").read_text(encoding="utf-8"))["logging_steps"] == 3
    logged = [e["step"] for e in json.loads((out / "log_history.json").read_text(encoding="utf-8")) if "loss" in e]
    assert [s for s in logged if s > 4] == [6]  # every third step after the resume; every step before it
    checkpoint = json.loads((out / "checkpoint-8" / "run_fingerprint.json").read_text(encoding="utf-8"))
    assert checkpoint["lora_r"] == 16 and len(checkpoint["training_rows"]) == 16


DAMAGES = [  # (file in checkpoint-4, what is written there, the words of the one line)
    ("run_fingerprint.json", "{not json", "run_fingerprint.json is damaged"),
    ("run_fingerprint.json", None, "has no run_fingerprint.json"),
    ("trainer_state.json", "{not json", "trainer_state.json is damaged"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, text, words", DAMAGES, ids=[f"{n}-{t is None}" for n, t, _ in DAMAGES])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(name, text, words, stopped, tmp_path, no_model):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    target = out / "checkpoint-4" / name
    target.unlink() if text is None else target.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(words)):
        train(parse_config(RUN + ["--output_dir", str(out), *RESUME]))
