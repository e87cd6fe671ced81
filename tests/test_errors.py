"""Bad input, through the command line and through the Python API: one line naming the problem and
the fix, exit code 2, no traceback, nothing written, and caught before any model loads."""

import importlib
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from tinyllama_ft import export_merged, generate, load_saved, load_rows, parse_config, train
from tinyllama_ft.cli import main
from tinyllama_ft.errors import UserError
from tinyllama_ft.model.loading import build_tiny_model, build_tiny_tokenizer

GOOD = {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "open_qa"}

DATASETS = {
    "missing_column.jsonl": [{"instruction": "a", "context": ""}] * 50,
    "misspelt_column.jsonl": [{"instruction": "a", "contex": "", "response": "b"}] * 50,
    "null_field.jsonl": [GOOD] * 10 + [dict(GOOD, context=None)] + [GOOD] * 39,
    "number_field.jsonl": [GOOD] * 10 + [dict(GOOD, response=42)] + [GOOD] * 39,
    "empty_instruction.jsonl": [GOOD] * 3 + [dict(GOOD, instruction="  ")] + [GOOD] * 46,
    "empty_response.jsonl": [GOOD] * 3 + [dict(GOOD, response="")] + [GOOD] * 46,
    "empty.jsonl": [],
}

CASES = [  # (flags after `train --preset smoke`, expected words in the one-line error)
    (["--dataset_name", "{tmp}/missing_column.jsonl"], "row 0 has no column 'response'"),
    (["--dataset_name", "{tmp}/misspelt_column.jsonl"], "row 0 has no column 'context' but has 'contex'"),
    (["--dataset_name", "{tmp}/null_field.jsonl"], "row 10: 'context' is NoneType"),
    (["--dataset_name", "{tmp}/number_field.jsonl"], "row 10: 'response' is int"),
    (["--dataset_name", "{tmp}/empty_instruction.jsonl"], "row 3: 'instruction' is empty"),
    (["--dataset_name", "{tmp}/empty_response.jsonl"], "row 3: 'response' is empty"),
    (["--dataset_name", "{tmp}/empty.jsonl"], "has no rows"),
    (["--dataset_name", "{tmp}/nowhere.jsonl"], "does not exist"),
    (["--dataset_name", "{tmp}/rows.txt"], "not .json, .jsonl, .csv or .parquet"),
    (["--dataset_name", "{tmp}/rows.csv"], "rows.csv has no rows"),  # a header line only
    (["--dataset_name", "{tmp}/ragged.csv"], "row 1 (line 3) has more cells than the header"),
    (["--dataset_name", "{tmp}/broken.jsonl"], "invalid JSON on line 3"),
    (["--lora_rank", "8"], "lora_rank"),
    (["--lora_r", "eight"], "--lora_r eight: must be a whole number: pass --lora_r 16"),
    (["--lora_r", "0"], "lora_r must be > 0"),
    (["--learning_rate", "0"], "learning_rate must be > 0"),
    (["--max_length", "20"], "fits in max_length 20"),
    (["--eval_size", "30", "--test_size", "30"], "has only 48 rows"),
    (["--train_size", "40"], "has only 48 rows"),
    (["--precision", "fp16"], "needs a CUDA GPU"),
    (["--load_in_4bit"], "load_in_4bit needs a CUDA GPU"),
    (["--use_liger_kernel", "true"], "use_liger_kernel needs a CUDA GPU"),
    (["--lora_target_modules", "c_attn"], "no module named c_attn"),
    (["--model_name_or_path", "{tmp}/no_weights"], "no .safetensors weights"),
    (["--model_name_or_path", "{tmp}/no_tokenizer"], "no tokenizer files"),
    (["--dataset_name", "{tmp}/special.jsonl"], "special string '</s>'"),
    # --- second round: configuration files and values that contradict each other or the model ---
    (["--config", "{tmp}/broken.yaml"], "broken.yaml is not valid YAML (line 2, column 6"),
    (["--config", "{tmp}/list.yaml"], "holds a YAML list, not a mapping"),
    (["--config", "{tmp}/nowhere.yaml"], "nowhere.yaml: No such file or directory"),
    (["--save_steps", "0"], "save_steps must be > 0"),
    (["--eval_steps", "-5"], "eval_steps must be > 0"),
    (["--logging_steps", "-1"], "logging_steps must be > 0"),
    (["--max_steps", "0"], "max_steps must be > 0, or -1"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be > 0"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be > 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be > 0"),
    (["--lora_dropout", "1"], "lora_dropout must be in [0, 1)"),
    (["--lora_r", "2", "--lora_alpha", "4096"], "lora_alpha 4096 is over 64 x lora_r 2"),
    (["--lora_r", "64"], "lora_r 64 is larger than k_proj's smallest dimension 32"),
    (["--max_length", "4096"], "max_length 4096 is beyond the model's 1024 positions"),
    (["--eval_size", "0", "--eval_steps", "3"], "eval_steps is set but eval_size is 0"),
    (["--test_size", "0"], "num_generate (8) is larger than test_size (0)"),
    (["--precision", "fp8"], "--precision fp8: must be one of auto, bf16, fp16, fp32"),
    (["--lr_scheduler_type", "bogus"], "bogus is not a valid SchedulerType"),
    (["--lora_target_modules"], "expected at least one argument"),
    (["--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"], "contradict each other"),
    # --- files that are not what their name says, and the wrong kind of folder ---
    (["--dataset_name", "{tmp}/empty_folder"], "is a folder without .json, .jsonl, .parquet"),
    (["--dataset_name", "{tmp}/text.parquet"], "is not a Parquet file"),
    (["--dataset_name", "{tmp}/object.json"], "holds one JSON object, not rows"),
    (["--dataset_name", "{tmp}/latin1.jsonl"], "is not UTF-8 text"),
    (["--output_dir", "{tmp}/a_file.txt"], "is a file, not a folder"),
    (["--output_dir", "{tmp}/no_tokenizer"], "holds a model (config.json and model weights), not a run"),
    (["--resume_from_checkpoint", "{tmp}"], "is not a checkpoint (no trainer_state.json)"),
    (["--resume_from_checkpoint", "{tmp}/nowhere"], "does not exist: pass a checkpoint-N folder"),
    # --- third round: layers LoRA cannot adapt, folders of the user's own files ---
    (["--lora_target_modules", "input_layernorm"], "input_layernorm is a LlamaRMSNorm, which LoRA cannot adapt"),
    (["--lora_target_modules", "embed_tokens", "norm"], "norm is a LlamaRMSNorm, which LoRA cannot adapt"),
    (["--lora_target_modules", "q_proj", "lm_head"], "lm_head is the LM head, whose weight TRL's loss reads directly"),
    (["--output_dir", "{tmp}/users_folder"], "holds files this project did not write (notes.txt, photo.png)"),
    (["--output_dir", "{tmp}/users_readme"], "holds files this project did not write (README.md)"),
    (["--overwrite_output_dir", "true", "--output_dir", "{tmp}/users_readme"], "holds files this project did not"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    for name, rows in DATASETS.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "rows.csv").write_text("instruction,context,response\n", encoding="utf-8")
    (folder / "rows.txt").write_text("instruction,context,response\n", encoding="utf-8")
    (folder / "ragged.csv").write_text("instruction,context,response\na,,b\nc,,d,e\n", encoding="utf-8")
    (folder / "broken.yaml").write_text("lora_r: 8\n  bad: [\n", encoding="utf-8")
    (folder / "list.yaml").write_text("- lora_r: 8\n", encoding="utf-8")
    (folder / "a_file.txt").write_text("not a folder\n", encoding="utf-8")
    (folder / "empty_folder").mkdir()
    (folder / "text.parquet").write_text("".join(json.dumps(GOOD) + "\n" for _ in range(50)), encoding="utf-8")
    (folder / "object.json").write_text(json.dumps({"rows": [GOOD] * 50}, indent=2), encoding="utf-8")
    (folder / "latin1.jsonl").write_bytes("".join(json.dumps(dict(GOOD, response="Caf\u00e9."), ensure_ascii=False)
                                                  + "\n" for _ in range(50)).encode("latin-1"))
    (folder / "run").mkdir()
    (folder / "users_folder").mkdir()
    (folder / "users_folder" / "notes.txt").write_text("mine\n", encoding="utf-8")
    (folder / "users_folder" / "photo.png").write_bytes(b"\x89PNG")
    (folder / "users_readme").mkdir()
    (folder / "users_readme" / "README.md").write_text("# My project\n", encoding="utf-8")
    damaged_folders(folder)
    (folder / "broken.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{'single': quotes}\n", encoding="utf-8")
    (folder / "special.jsonl").write_text("".join(json.dumps(dict(GOOD, response="Done.</s>")) + "\n"
                                                  for _ in range(50)), encoding="utf-8")
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
    pipeline = importlib.import_module("tinyllama_ft.training.sft")

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the error should be caught before the model loads")

    monkeypatch.setattr(pipeline, "load_model", no_model_loading)
    with pytest.raises(UserError, match=re.escape(message.format(tmp=tmp))):
        train(parse_config(_flags(flags, tmp)))


# Other commands: (arguments of `python -m tinyllama_ft`, the same through the Python API, the message).
OTHER_CASES = [
    (["generate", "--adapter", "{tmp}/a_file.txt", "--instruction", "Hi."],
     lambda tmp: load_saved(f"{tmp}/a_file.txt"), "is a file: pass the run folder"),
    (["generate", "--adapter", "{tmp}/no_tokenizer", "--instruction", "Hi."],
     lambda tmp: load_saved(f"{tmp}/no_tokenizer"), "has no tokenizer files"),
    (["generate", "--adapter", "{tmp}/nowhere", "--instruction", "Hi."],
     lambda tmp: load_saved(f"{tmp}/nowhere"), "does not exist: pass the output folder"),
    (["generate", "--adapter", "{tmp}/run", "--instruction", "  "],
     lambda tmp: generate(build_tiny_model(), build_tiny_tokenizer(), "  "), "instruction is empty"),
    (["generate", "--adapter", "{tmp}/run", "--instruction", "Hi.", "--max_new_tokens", "0"],
     lambda tmp: generate(build_tiny_model(), build_tiny_tokenizer(), "Hi.", max_new_tokens=0),
     "max_new_tokens must be > 0"),
    (["export", "--adapter", "{tmp}/run", "--out", "{tmp}/run/merged"],
     lambda tmp: export_merged(f"{tmp}/run", f"{tmp}/run/merged"), "is inside the run folder"),
    (["export", "--adapter", "{tmp}/run", "--out", "{tmp}/a_file.txt"],
     lambda tmp: export_merged(f"{tmp}/run", f"{tmp}/a_file.txt"), "is an existing file"),
    (["export", "--adapter", "{tmp}/no_tokenizer", "--out", "{tmp}/merged"],
     lambda tmp: export_merged(f"{tmp}/no_tokenizer", f"{tmp}/merged"), "has no tokenizer files"),
    (["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name", "{tmp}/text.parquet"],
     lambda tmp: load_rows(f"{tmp}/text.parquet"), "is not a Parquet file"),
    (["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name", "{tmp}/empty_folder", "--n", "3"],
     lambda tmp: load_rows(f"{tmp}/empty_folder"), "is a folder without"),
]
DAMAGED = [  # (folder, the words of the one line): saved folders cut short, edited, or from another tool
    ("bad_adapter_json", "adapter_config.json is damaged (JSONDecodeError"),
    ("bad_run_config", "bad_run_config/run_config.json is "),  # "unreadable" (its system prompt) or "damaged"
    ("truncated_weights", "adapter_model.safetensors is damaged (truncated: "),
    ("empty_weights", "adapter_model.safetensors is damaged (0 bytes, not a safetensors file)"),
    ("bad_header", "adapter_model.safetensors is damaged (its header is not JSON)"),
    ("bad_model_config", "config.json is damaged"),
    ("other_tool", "is neither a run folder (adapter_config.json) nor a merged export"),
]
for name, words in DAMAGED:
    OTHER_CASES += [(["generate", "--adapter", f"{{tmp}}/{name}", "--instruction", "Hi."],
                     lambda tmp, name=name: load_saved(f"{tmp}/{name}"), words),
                    (["export", "--adapter", f"{{tmp}}/{name}", "--out", f"{{tmp}}/{name}-merged"],
                     lambda tmp, name=name: export_merged(f"{tmp}/{name}", f"{tmp}/{name}-merged"), words)]


def damaged_folders(folder):
    import torch
    from safetensors.torch import save_file

    def adapter(name, config="{}", run_config=None):
        (folder / name).mkdir()
        (folder / name / "adapter_config.json").write_text(config, encoding="utf-8")
        save_file({"w": torch.zeros(64)}, str(folder / name / "adapter_model.safetensors"))
        if run_config is not None:
            (folder / name / "run_config.json").write_text(run_config, encoding="utf-8")
        return folder / name / "adapter_model.safetensors"

    adapter("bad_adapter_json", config='{"r": 16,')
    adapter("bad_run_config", run_config="{'system_prompt': ")
    weights = adapter("truncated_weights")
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    adapter("empty_weights").write_bytes(b"")
    adapter("bad_header").write_bytes((20).to_bytes(8, "little") + b"not json at all....." + b"\0" * 64)
    (folder / "bad_model_config").mkdir()
    (folder / "bad_model_config" / "config.json").write_text("{", encoding="utf-8")
    save_file({"w": torch.zeros(4)}, str(folder / "bad_model_config" / "model.safetensors"))
    (folder / "other_tool").mkdir()  # e.g. an old PyTorch checkpoint
    (folder / "other_tool" / "pytorch_model.bin").write_bytes(b"PK")
    (folder / "other_tool" / "config.json").write_text("{}", encoding="utf-8")


PREVIEW_ONLY = [  # flags of the command line alone (no Python API takes them)
    (["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name", "{tmp}/broken.jsonl", "--n", "0"],
     "--n must be > 0"),
    (["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name", "{tmp}/special.jsonl", "--out",
      "{tmp}/empty_folder"], "is a folder: pass a file path"),
    (["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name", "{tmp}/special.jsonl", "--out",
      "{tmp}/a_file.txt/rows.jsonl"], "a_file.txt is a file, not a folder"),
    (["serve", "--adapter", "{tmp}/truncated_weights", "--port", "0"], "--port must be between 1 and 65535"),
    (["chat", "--adapter", "{tmp}/truncated_weights", "--max_new_tokens", "0"],
     "--max_new_tokens 0: max_new_tokens must be > 0"),
    (["chat", "--adapter", "{tmp}/truncated_weights", "--top_p", "0"], "--top_p 0: top_p must be in (0, 1]"),
]


@pytest.mark.parametrize("args, api, message", OTHER_CASES, ids=[" ".join(c[0][:3]) for c in OTHER_CASES])
def test_other_commands(args, api, message, tmp, capsys, monkeypatch):
    saved_model = importlib.import_module("tinyllama_ft.storage.saved_model")

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the error should be caught before the model loads")

    monkeypatch.setattr(saved_model, "load_model", no_model_loading)
    assert main([a.format(tmp=tmp) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    with pytest.raises(UserError, match=re.escape(message)):
        api(tmp)


@pytest.mark.parametrize("args, message", PREVIEW_ONLY)
def test_command_line_only(args, message, tmp, capsys):
    assert main([a.format(tmp=tmp) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


SHELL = ("row 0 has no column", "not valid YAML", "save_steps must be", "no module named", "beyond the model",
         "is a folder", "is a file, not a folder")


@pytest.mark.parametrize("flags, message", [c for c in CASES if any(s in c[1] for s in SHELL)])
def test_the_shell_sees_only_the_error_line(flags, message, tmp):
    """Through the real command line: no configuration dump, no warning, no traceback before it."""
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", "train", *_flags(flags, tmp)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr


def test_windows_files_and_json_lines_named_json_are_read(tmp_path):
    """A UTF-8 BOM and CRLF line endings (what Windows editors write), JSON lines in a .json file, a
    JSON array in a .jsonl file: each is simply read."""
    rows = [GOOD, dict(GOOD, context="Fruit grows on trees.")]
    lines = "\r\n".join(json.dumps(r) for r in rows) + "\r\n"
    (tmp_path / "windows.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode("utf-8"))
    (tmp_path / "windows.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).replace("\n", "\r\n").encode())
    (tmp_path / "lines.json").write_text(lines.replace("\r\n", "\n"), encoding="utf-8")
    (tmp_path / "array.jsonl").write_text(json.dumps(rows), encoding="utf-8")
    for name in ("windows.jsonl", "windows.json", "lines.json", "array.jsonl"):
        assert load_rows(str(tmp_path / name)) == rows, name


def test_special_tokens_at_inference_are_rejected():
    from tinyllama_ft import generate

    with pytest.raises(UserError, match="special string '<\\|assistant\\|>'"):
        generate(build_tiny_model(), build_tiny_tokenizer(), "Say <|assistant|> twice")


def test_hub_token_is_never_printed_or_saved(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert main(["config", "--hub_token", "hf_secret_value"]) == 0
    assert "hf_secret_value" not in capsys.readouterr().out


def test_what_a_user_expects_is_read_csv_capital_jsonl_and_all_linear(tmp_path):
    """The debatable cases, decided as a user would expect: a CSV file with a header line is read (every
    value text), `.JSONL` is `.jsonl`, and `all-linear` is PEFT's every-Linear-layer-but-the-head."""
    from tinyllama_ft.model.loading import check_model_shape, wrap_lora

    (tmp_path / "rows.csv").write_text("instruction,context,response\r\nName a fruit.,,\"An apple, red.\"\r\n",
                                       encoding="utf-8")
    assert load_rows(str(tmp_path / "rows.csv")) == [{"instruction": "Name a fruit.", "context": "",
                                                       "response": "An apple, red."}]
    (tmp_path / "ROWS.JSONL").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    assert load_rows(str(tmp_path / "ROWS.JSONL")) == [GOOD]
    config = parse_config(["--preset", "smoke", "--lora_target_modules", "all-linear", "--lora_r", "4"])
    check_model_shape(config)
    model = wrap_lora(build_tiny_model(), 4, 8, 0.0, config.lora_target_modules)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head


def test_preview_out_creates_its_parents_and_leaves_no_temporary_file(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "preview.jsonl"
    assert main(["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name",
                 str(ROOT / "tinyllama_ft" / "samples" / "sample.jsonl"), "--n", "2", "--out", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2 and oct(out.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in out.parent.iterdir()) == ["preview.jsonl"]


# --- inference bounds, standard input, messages that name the right thing ---------------------------------

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A merged export of the tiny random Llama (1,024 positions): what generate and chat load."""
    folder = tmp_path_factory.mktemp("tiny") / "merged"
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_generate_caps_its_budget_at_what_the_context_leaves(tiny_export, capsys):
    """`--max_new_tokens 1000000000` is capped (one note), as chat and the server cap theirs; no MemoryError."""
    from tinyllama_ft.data.encoding import encode_prompt
    from tinyllama_ft.data.formats import prompt_messages
    from tinyllama_ft.model.generation import new_token_budget

    instruction = "Name a fruit. " * 100
    prompt = encode_prompt(build_tiny_tokenizer(), prompt_messages(instruction))
    room = 1024 - len(prompt)
    assert 0 < room < 1024 and new_token_budget(build_tiny_model(), [prompt], 10**9) == room
    # the same cap in the Python API, which train's and dpo's generation stages call: a batch gets what its
    # longest prompt leaves
    answers = generate(build_tiny_model(), build_tiny_tokenizer(), [instruction, "Hi."], max_new_tokens=10**9,
                       progress=False)
    assert all(answer["tokens"] <= room for answer in answers), [a["tokens"] for a in answers]
    assert main(["generate", "--adapter", str(tiny_export), "--instruction", instruction, "--max_new_tokens",
                 "1000000000"]) == 0
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # (weight loading's bar aside)
    assert [line for line in err if line.startswith("(max_new_tokens")] == [
        f"(max_new_tokens capped at {room}: the prompt's {len(prompt)} tokens leave {room} of the model's 1024 "
        "positions)"] and "Traceback" not in "".join(err), err


def test_a_prompt_longer_than_the_context_is_refused_by_generate_as_by_chat_and_serve(tiny_export, capsys):
    assert main(["generate", "--adapter", str(tiny_export), "--instruction", "Name a fruit. " * 400]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert re.fullmatch(r"error: the prompt is \d+ tokens, the model's context 1024: shorten it", err[-1]), err
    assert "Traceback" not in "".join(err)
    with pytest.raises(UserError, match="the model's context 1024: shorten it"):
        generate(build_tiny_model(), build_tiny_tokenizer(), "Name a fruit. " * 400)


def test_chat_with_a_closed_standard_input_ends_quietly(tiny_export, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a process started with stdin closed
    assert main(["chat", "--adapter", str(tiny_export), "--max_new_tokens", "4"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_chat_refuses_a_budget_that_leaves_no_room_for_a_message(tiny_export, capsys):
    assert main(["chat", "--adapter", str(tiny_export), "--max_new_tokens", "5000"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert err[-1] == ("error: --max_new_tokens 5000 leaves no room for a message in the model's 1024 positions: "
                       "pass at most 512") and "Traceback" not in "".join(err), err


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(tiny_export, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nName a fruit.\n"),
                                                       encoding="utf-8"))
    assert main(["chat", "--adapter", str(tiny_export), "--max_new_tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "error: this line holds the byte 0xe9, which is not utf-8 text: send text in that encoding" in captured.err
    assert captured.out.strip() == generate(build_tiny_model(), build_tiny_tokenizer(), "Name a fruit.",
                                            max_new_tokens=4, progress=False)["text"]


def test_evaluate_names_a_missing_adapter_not_out(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    assert main(["evaluate", "--adapter", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --adapter {tmp_path / 'nowhere'} does not exist"), err
    assert "--out" not in err[0] and not (tmp_path / "nowhere").exists()


def test_a_folder_saved_with_save_to_disk_loads_like_any_local_dataset(tmp_path):
    import datasets

    from tinyllama_ft.data.pairs import load_pairs

    rows = [GOOD, dict(GOOD, instruction="Name a vegetable.", response="A leek.")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "two"))
    assert load_rows(str(tmp_path / "one")) == rows and load_rows(str(tmp_path / "one"), dataset_split="train[1:]") \
        == rows[1:]
    assert load_rows(str(tmp_path / "two"), dataset_split="test") == rows[:1]
    with pytest.raises(UserError, match="has no split 'validation' \\(splits: train, test\\)"):
        load_rows(str(tmp_path / "two"), dataset_split="validation")
    pairs = [{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."}]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs"))
    assert load_pairs(str(tmp_path / "pairs")) == pairs
