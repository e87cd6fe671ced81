"""Bad input, through the command line and through the Python API: one line naming the problem and
the fix, exit code 2, no traceback, nothing written, and caught before any model loads."""

import importlib
import json

import pytest

from tinyllama_ft import parse_config, train
from tinyllama_ft.cli import main
from tinyllama_ft.errors import UserError
from tinyllama_ft.modeling import build_tiny_model, build_tiny_tokenizer

GOOD = {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "open_qa"}

DATASETS = {
    "missing_column.jsonl": [{"instruction": "a", "response": "b"}] * 50,
    "misspelt_column.jsonl": [{"instruction": "a", "contex": "", "response": "b"}] * 50,
    "null_field.jsonl": [GOOD] * 10 + [dict(GOOD, context=None)] + [GOOD] * 39,
    "number_field.jsonl": [GOOD] * 10 + [dict(GOOD, response=42)] + [GOOD] * 39,
    "empty_instruction.jsonl": [GOOD] * 3 + [dict(GOOD, instruction="  ")] + [GOOD] * 46,
    "empty_response.jsonl": [GOOD] * 3 + [dict(GOOD, response="")] + [GOOD] * 46,
    "empty.jsonl": [],
}

CASES = [  # (flags after `train --preset smoke`, expected words in the one-line error)
    (["--dataset_name", "{tmp}/missing_column.jsonl"], "row 0 has no column 'context'"),
    (["--dataset_name", "{tmp}/misspelt_column.jsonl"], "row 0 has no column 'context'"),
    (["--dataset_name", "{tmp}/null_field.jsonl"], "row 10: 'context' is NoneType"),
    (["--dataset_name", "{tmp}/number_field.jsonl"], "row 10: 'response' is int"),
    (["--dataset_name", "{tmp}/empty_instruction.jsonl"], "row 3: 'instruction' is empty"),
    (["--dataset_name", "{tmp}/empty_response.jsonl"], "row 3: 'response' is empty"),
    (["--dataset_name", "{tmp}/empty.jsonl"], "has no rows"),
    (["--dataset_name", "{tmp}/nowhere.jsonl"], "does not exist"),
    (["--dataset_name", "{tmp}/rows.csv"], "not .json, .jsonl or .parquet"),
    (["--dataset_name", "{tmp}/broken.jsonl"], "invalid JSON on line 3"),
    (["--lora_rank", "8"], "lora_rank"),
    (["--lora_r", "eight"], "invalid int value: 'eight'"),
    (["--lora_r", "0"], "lora_r must be > 0"),
    (["--learning_rate", "0"], "learning_rate must be > 0"),
    (["--max_length", "20"], "fits in max_length 20"),
    (["--eval_size", "30", "--test_size", "30"], "has only 48 rows"),
    (["--train_size", "40"], "has only 48 rows"),
    (["--precision", "fp16"], "needs a CUDA GPU"),
    (["--precision", "bf16"], "needs a CUDA GPU"),
    (["--load_in_4bit"], "load_in_4bit needs a CUDA GPU"),
    (["--use_liger_kernel", "true"], "use_liger_kernel needs a CUDA GPU"),
    (["--lora_target_modules", "c_attn"], "no module named c_attn"),
    (["--model_name_or_path", "{tmp}/no_weights"], "no .safetensors weights"),
    (["--model_name_or_path", "{tmp}/no_tokenizer"], "no tokenizer files"),
    (["--dataset_name", "{tmp}/special.jsonl"], "special string '</s>'"),
    (["--resume_from_checkpoint", "true"], "no checkpoint to resume from"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    for name, rows in DATASETS.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rows.csv").write_text("instruction,context,response\n")
    (folder / "broken.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{'single': quotes}\n")
    (folder / "special.jsonl").write_text("".join(json.dumps(dict(GOOD, response="Done.</s>")) + "\n"
                                                  for _ in range(50)))
    build_tiny_tokenizer().save_pretrained(folder / "no_weights")  # a tokenizer, no weights
    build_tiny_model().save_pretrained(folder / "no_tokenizer")  # real config and weights, no tokenizer
    return folder


def _flags(flags, tmp):
    return ["--preset", "smoke", "--output_dir", str(tmp / "out")] + [f.format(tmp=tmp) for f in flags]


@pytest.mark.parametrize("flags, message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_command_line(flags, message, tmp, capsys):
    assert main(["train", *_flags(flags, tmp)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not (tmp / "out" / "metrics.json").exists()


@pytest.mark.parametrize("flags, message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_python_api(flags, message, tmp, monkeypatch):
    pipeline = importlib.import_module("tinyllama_ft.train")

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the error should be caught before the model loads")

    monkeypatch.setattr(pipeline, "load_model", no_model_loading)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("'", ".")):
        train(parse_config(_flags(flags, tmp)))


def test_special_tokens_at_inference_are_rejected():
    from tinyllama_ft import generate

    with pytest.raises(UserError, match="special string '<\\|assistant\\|>'"):
        generate(build_tiny_model(), build_tiny_tokenizer(), "Say <|assistant|> twice")


def test_hub_token_is_never_printed_or_saved(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert main(["config", "--hub_token", "hf_secret_value"]) == 0
    assert "hf_secret_value" not in capsys.readouterr().out
