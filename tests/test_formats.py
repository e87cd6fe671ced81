"""Every dataset format, on literal ids with the real TinyLlama tokenizer; column mapping, hub configuration
and split, the system prompt; unusable conversations counted by reason; format-specific bad input as
one line (command line and Python API, exit 2, before the model loads); and, on real Dolly rows,
conversations of 1-3 turns whose trained positions are exactly the assistant turns and their EOS."""

import importlib
import json
import random

import pytest

from tinyllama_ft import parse_config, train
from tinyllama_ft.cli import main
from tinyllama_ft.settings.config import SAMPLE_DATA
from tinyllama_ft.data.prepare import exclusion_counts, split_rows
from tinyllama_ft.data.encoding import IGNORE_INDEX, encode_example, encode_prompt, encode_rows
from tinyllama_ft.data.formats import (format_user_turn, load_rows, prompt_messages, to_conversation,
                                       to_conversations, to_example)
from tinyllama_ft.errors import UserError
from tinyllama_ft.settings.columns import parse_columns

BOS, EOS = 1, 2
M = IGNORE_INDEX
# <s> <|user|>\nHi there</s>\n<|assistant|>\n   then   Hello ! </s>   (tests/test_tokenization.py)
HI_PROMPT = [BOS, 529, 29989, 1792, 29989, 29958, 13, 18567, 727, 2, 13, 29966, 29989, 465, 22137, 29989, 29958, 13]
HELLO = [10994, 29991, EOS]
# <s> <|system|>\nBe brief.</s>\n <|user|>\nHi</s>\n <|assistant|>\n Hello!</s> \n<|user|>\nBye</s>\n <|assistant|>\n Ciao.</s>
SYSTEM = [BOS, 529, 29989, 5205, 29989, 29958, 13, 3629, 11473, 29889, 2, 13]
USER_HI = [29966, 29989, 1792, 29989, 29958, 13, 18567, 2, 13]
ASSISTANT = [29966, 29989, 465, 22137, 29989, 29958, 13]
USER_BYE = [13, 29966, 29989, 1792, 29989, 29958, 13, 2059, 29872, 2, 13]
CIAO = [29907, 29653, 29889, EOS]
TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Ciao."}]


def _encode(tokenizer, row, fmt, system_prompt=None):
    return encode_example(tokenizer, to_conversation(row, fmt, system_prompt))


# --- literal ids for each format --------------------------------------------------------------------

@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "Hi there", "context": "", "response": "Hello!"}, "dolly"),
    ({"instruction": "Hi there", "input": "", "output": "Hello!"}, "alpaca"),
    ({"instruction": "Hi there", "output": "Hello!"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}, "messages"),
    ({"prompt": "Hi there", "completion": "Hello!"}, "prompt_completion"),
    ({"prompt": [{"role": "user", "content": "Hi there"}],
      "completion": [{"role": "assistant", "content": "Hello!"}]}, "prompt_completion"),
])
def test_one_turn_is_the_same_ids_in_every_format(tinyllama_tokenizer, row, fmt):
    item = _encode(tinyllama_tokenizer, row, fmt)
    assert item == {"input_ids": HI_PROMPT + HELLO, "labels": [M] * len(HI_PROMPT) + HELLO}


def test_two_turn_conversation_with_system_literal_ids_and_mask(tinyllama_tokenizer):
    item = _encode(tinyllama_tokenizer, {"messages": TWO_TURNS}, "messages")
    prompt1 = SYSTEM + USER_HI + ASSISTANT
    prompt2 = USER_BYE + ASSISTANT
    assert item["input_ids"] == prompt1 + [10994, 29991, EOS] + prompt2 + CIAO
    assert item["labels"] == [M] * len(prompt1) + [10994, 29991, EOS] + [M] * len(prompt2) + CIAO
    # before each assistant turn: exactly what inference (and `chat`) feeds at that point
    assert item["input_ids"][:len(prompt1)] == encode_prompt(tinyllama_tokenizer, TWO_TURNS[:2])
    assert item["input_ids"][:-len(CIAO)] == encode_prompt(tinyllama_tokenizer, TWO_TURNS[:4])


def test_system_prompt_is_the_first_turn_of_every_format(tinyllama_tokenizer):
    dolly = _encode(tinyllama_tokenizer, {"instruction": "Hi", "context": "", "response": "Hello!"}, "dolly",
                    system_prompt="Be brief.")
    alpaca = _encode(tinyllama_tokenizer, {"instruction": "Hi", "input": "", "output": "Hello!"}, "alpaca",
                     system_prompt="Be brief.")
    chat = _encode(tinyllama_tokenizer, {"messages": TWO_TURNS[1:3]}, "messages", system_prompt="Be brief.")
    completion = _encode(tinyllama_tokenizer, {"prompt": "Hi", "completion": "Hello!"}, "prompt_completion",
                         system_prompt="Be brief.")
    expected = SYSTEM + USER_HI + ASSISTANT + [10994, 29991, EOS]
    assert dolly == alpaca == chat == completion and dolly["input_ids"] == expected
    assert dolly["labels"] == [M] * (len(expected) - 3) + [10994, 29991, EOS]
    own = _encode(tinyllama_tokenizer, {"messages": TWO_TURNS}, "messages", system_prompt="Be long-winded.")
    assert own == _encode(tinyllama_tokenizer, {"messages": TWO_TURNS}, "messages")  # a row's own system turn wins
    assert encode_prompt(tinyllama_tokenizer, prompt_messages("Hi", "", "Be brief.")) == SYSTEM + USER_HI + ASSISTANT


def test_alpaca_rows_equal_their_dolly_rows_on_real_data(tinyllama_tokenizer, dolly_rows):
    for row in dolly_rows[:60]:
        alpaca = {"instruction": row["instruction"], "input": row["context"], "output": row["response"]}
        assert _encode(tinyllama_tokenizer, alpaca, "alpaca") == encode_example(tinyllama_tokenizer, to_example(row))


def test_prompt_completion_trains_only_the_completion(tinyllama_tokenizer):
    row = {"prompt": TWO_TURNS[:4], "completion": [TWO_TURNS[4]]}
    item = _encode(tinyllama_tokenizer, row, "prompt_completion")
    conversation = _encode(tinyllama_tokenizer, {"messages": TWO_TURNS}, "messages")
    assert item["input_ids"] == conversation["input_ids"]
    assert item["labels"] == [M] * (len(item["labels"]) - len(CIAO)) + CIAO  # "Hello!" is context here


def test_formats_are_detected_from_the_columns():
    rows = {"dolly": {"instruction": "a", "context": "", "response": "b"},
            "alpaca": {"instruction": "a", "input": "", "output": "b"},
            "messages": {"messages": TWO_TURNS[1:3]}, "prompt_completion": {"prompt": "a", "completion": "b"}}
    for fmt, row in rows.items():
        assert to_conversations([row]) == [to_conversation(row, fmt)], fmt
    assert to_conversations([rows["messages"]])[0] == {"messages": TWO_TURNS[1:3], "category": ""}


# --- unusable conversations: excluded, counted by reason ----------------------------------------------

U, A = "user", "assistant"


def _conversation(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns], "category": ""}


UNUSABLE = [
    (_conversation((U, "hi")), "no assistant turn"),
    (_conversation(), "no assistant turn"),
    (_conversation((U, "hi"), (A, "  ")), "empty assistant turn"),
    (_conversation((U, ""), (A, "ok")), "empty user turn"),
    (_conversation((A, "ok"), (U, "hi"), (A, "ok")), "roles out of order"),
    (_conversation((U, "a"), (U, "b"), (A, "ok")), "roles out of order"),
    (_conversation((U, "a"), ("system", "b"), (A, "ok")), "roles out of order"),
    (_conversation((U, "a"), (A, "b"), (U, "c")), "roles out of order"),
    (_conversation((U, "a"), ("tool", "b"), (A, "ok")), "unknown role"),
    (_conversation((U, "a </s> b"), (A, "ok")), "special-token text"),
    (_conversation((U, "a"), (A, "<|user|> b")), "special-token text"),
    (_conversation((U, "a"), (A, "b"), (U, "c"), (A, "d" * 3000)), "over max_length"),
]


def test_unusable_conversations_are_excluded_and_counted_by_reason(tinyllama_tokenizer):
    good = _conversation((U, "Hi"), (A, "Hello!"))
    rows = [good] + [row for row, _ in UNUSABLE] + [good]
    encoded, excluded, _ = encode_rows(tinyllama_tokenizer, rows, max_length=512)
    assert sorted(encoded) == [0, len(rows) - 1]
    assert {i: exclusion_counts({i: why}) for i, why in excluded.items()} == {
        i + 1: {kind: 1} for i, (_, kind) in enumerate(UNUSABLE)}
    assert exclusion_counts(excluded) == {"roles out of order": 4, "no assistant turn": 2, "special-token text": 2,
                                          "empty assistant turn": 1, "empty user turn": 1, "unknown role": 1,
                                          "over max_length": 1}


def test_split_works_without_categories():
    rows = [_conversation((U, str(i)), (A, "x")) for i in range(30)]
    del rows[0]["category"]
    split = split_rows(rows, list(range(30)), train_size=20, eval_size=5, test_size=5, seed=0)
    assert sorted(split["train"] + split["validation"] + split["test"]) == list(range(30))


# --- column mapping, hub configuration and split ------------------------------------------------------

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_data_fields_from_the_notebook_and_its_environment():
    from tinyllama_ft import notebook_config

    config = notebook_config({"columns": {"instruction": "question"}, "system_prompt": "Hi"}, environ={})
    assert (config.columns, config.system_prompt) == ({"instruction": "question"}, "Hi")
    config = notebook_config({}, environ={"TINYLLAMA_FT_COLUMNS": "instruction=question,response=answer",
                                          "TINYLLAMA_FT_DATASET_FORMAT": "alpaca"})
    assert (config.columns, config.dataset_format) == ({"instruction": "question", "response": "answer"}, "alpaca")


def test_columns_from_a_flag_json_yaml_and_python(tmp_path):
    expected = {"instruction": "question", "response": "answer"}
    assert parse_columns("instruction=question, response=answer") == expected
    assert parse_config(["--columns", "instruction=question,response=answer"]).columns == expected
    assert parse_config(["--columns", json.dumps(expected)]).columns == expected
    assert parse_config(columns=expected).columns == expected
    (tmp_path / "c.yaml").write_text("columns:\n  instruction: question\n  response: answer\n", encoding="utf-8")
    assert parse_config(["--config", str(tmp_path / "c.yaml")]).columns == expected
    assert parse_config([]).columns is None


def test_mapped_columns_give_the_rows_of_the_format(tmp_path, tinyllama_tokenizer):
    rows = [{"question": "Hi there", "ctx": "", "answer": "Hello!", "type": "open_qa", "id": 7}]
    loaded = load_rows(_write(tmp_path / "d.jsonl", rows), columns=parse_columns(
        "instruction=question,context=ctx,response=answer,category=type"))
    assert loaded == [{"id": 7, "instruction": "Hi there", "context": "", "response": "Hello!", "category": "open_qa"}]
    assert encode_example(tinyllama_tokenizer, to_conversations(loaded)[0])["input_ids"] == HI_PROMPT + HELLO
    chats = [{"conversation": TWO_TURNS[1:3]}]
    loaded = load_rows(_write(tmp_path / "c.jsonl", chats), columns={"messages": "conversation"})
    assert to_conversations(loaded)[0]["messages"] == TWO_TURNS[1:3]


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    """A local dataset folder with two configurations, read by `datasets.load_dataset` as a hub dataset is."""
    folder = tmp_path_factory.mktemp("hub_like")
    chats = [json.loads(line) for line in open(SAMPLE_DATA.replace("sample.jsonl", "sample_messages.jsonl"), encoding="utf-8")]
    (folder / "chat").mkdir()
    _write(folder / "chat" / "train.jsonl", chats)
    _write(folder / "chat" / "test.jsonl", chats[:3])
    (folder / "plain").mkdir()
    _write(folder / "plain" / "train.jsonl", [json.loads(line) for line in open(SAMPLE_DATA, encoding="utf-8")])
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train.jsonl\n"
        "  - split: test\n    path: chat/test.jsonl\n- config_name: plain\n  data_files:\n  - split: train\n"
        "    path: plain/train.jsonl\n---\n", encoding="utf-8")
    return folder


def test_hub_configuration_and_split(dataset_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    assert len(load_rows(str(dataset_folder), "chat", "test")) == 3
    assert "messages" in load_rows(str(dataset_folder), "chat")[0]
    assert "instruction" in load_rows(str(dataset_folder), "plain", "train")[0]


def test_prepare_data_on_a_hub_configuration_with_a_system_prompt(dataset_folder, tmp_path, monkeypatch):
    from tinyllama_ft import load_tokenizer, prepare_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    config = parse_config(preset="smoke", dataset_name=str(dataset_folder), dataset_config="chat",
                          system_prompt="  Be brief. ", output_dir=str(tmp_path / "o"), max_length=512)
    assert config.system_prompt == "Be brief."
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    assert len(data.rows) == 48 and not data.excluded
    for index in data.split["train"]:
        messages = data.conversations[index]["messages"]
        assert messages[0]["role"] == "system"  # the file's own, or the system prompt
        own = data.rows[index]["messages"][0]
        assert messages[0]["content"] == (own["content"] if own["role"] == "system" else "Be brief.")


# --- evaluation generates the last assistant turn given the earlier ones -------------------------------

def test_evaluation_generates_the_last_turn_given_the_earlier_ones(tmp_path, monkeypatch):
    from tinyllama_ft import evaluate_model, load_tokenizer, prepare_data, setup_model

    config = parse_config(preset="smoke", dataset_name=SAMPLE_DATA.replace("sample.jsonl", "sample_messages.jsonl"),
                          system_prompt="Be brief.", output_dir=str(tmp_path / "o"), tokenization_cache=False)
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    seen = {}

    def spy(model, tokenizer, instructions, *args, **kwargs):
        seen["prompts"] = [encode_prompt(tokenizer, prompt_messages(m)) for m in instructions]
        return [{"text": "x", "ended": True} for _ in instructions]

    monkeypatch.setattr(importlib.import_module("tinyllama_ft.evaluation.dolly"), "generate", spy)
    metrics = evaluate_model(config, setup_model(config, tokenizer), tokenizer, data)
    for prompt, index in zip(seen["prompts"], data.generate_rows):
        ids, labels = data.encoded[index]["input_ids"], data.encoded[index]["labels"]
        last_turn_start = max(i for i in range(1, len(ids)) if labels[i] != M and labels[i - 1] == M)
        assert prompt == ids[:last_turn_start]  # the earlier turns, the system prompt, the generation prompt
    assert len(seen["prompts"]) == config.num_generate
    trained = sum(sum(label != M for label in data.encoded[i]["labels"]) for i in data.split["validation"])
    assert metrics["eval_tokens"] == trained  # every assistant turn of every validation row is scored
    assert any(sum(m["role"] == "assistant" for m in data.conversations[i]["messages"]) > 1
               for i in data.split["validation"])


# --- real tokenizer, real Dolly rows: conversations of 1-3 turns --------------------------------------

def conversations_from_dolly(rows: list[dict], n: int, seed: int = 0) -> list[list[dict]]:
    """`n` conversations of 1-3 turns of real Dolly rows (user = instruction + context), a third with a
    system turn."""
    rng = random.Random(seed)
    systems = ["You are a helpful assistant.", "Answer briefly and precisely.", "You are a careful expert."]
    result = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < 1 / 3 else []
        for row in rng.sample(rows, rng.randint(1, 3)):
            messages += [{"role": "user", "content": format_user_turn(row["instruction"], row["context"])},
                         {"role": "assistant", "content": row["response"].strip()}]
        result.append(messages)
    return result


def test_real_conversations_train_exactly_the_assistant_turns(tinyllama_tokenizer, dolly_rows):
    tok = tinyllama_tokenizer
    conversations = conversations_from_dolly(dolly_rows, 600)
    encoded, excluded, _ = encode_rows(tok, [{"messages": c} for c in conversations], max_length=10**6)
    assert all("special string" in why for why in excluded.values()) and len(encoded) > 580
    turns = {1: 0, 2: 0, 3: 0}
    for index, item in encoded.items():
        messages, ids, labels = conversations[index], encoded[index]["input_ids"], encoded[index]["labels"]
        expected = [M] * len(ids)
        for end, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = encode_prompt(tok, messages[:end])  # what inference feeds before this turn
            assert ids[:len(prefix)] == prefix
            n = ids.index(EOS, len(prefix)) + 1 - len(prefix)
            assert tok.decode(ids[len(prefix):len(prefix) + n - 1]) == message["content"]
            assert EOS not in ids[len(prefix):len(prefix) + n - 1]
            expected[len(prefix):len(prefix) + n] = ids[len(prefix):len(prefix) + n]
        assert labels == expected  # trained: exactly each assistant turn and its EOS; -100 everywhere else
        full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == full[:len(ids)] and ids.count(BOS) == 1  # the chat template's own rendering (it writes the BOS)
        turns[sum(m["role"] == "assistant" for m in messages)] += 1
    print(f"real-tokenizer conversations checked: {len(encoded)} ({turns}), "
          f"{sum(m[0]['role'] == 'system' for m in (conversations[i] for i in encoded))} with a system turn")
    assert min(turns.values()) > 150


# --- format-specific bad input: one line, exit 2, before the model loads ------------------------------

GOOD_CHAT = {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]}
DOLLY = {"instruction": "Name a fruit.", "context": "", "response": "An apple."}
BAD_FILES = {
    "dolly.jsonl": [DOLLY] * 50,
    "ambiguous.jsonl": [dict(DOLLY, **GOOD_CHAT)] * 50,
    "messages_text.jsonl": [GOOD_CHAT] * 5 + [{"messages": "hello"}] + [GOOD_CHAT] * 44,
    "sharegpt.jsonl": [{"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 50,
    "no_assistant.jsonl": [{"messages": [{"role": "user", "content": "hi"}]}] * 30
    + [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}] * 20,
    "null_completion.jsonl": [{"prompt": "a", "completion": None}] * 50,
}
BAD = [  # (flags after `train --preset smoke`, expected words in the one-line error)
    (["--dataset_format", "csv"], "--dataset_format csv: must be one of auto, dolly, alpaca"),
    (["--columns", "instruction"], "'instruction' is not NAME=COLUMN"),
    (["--columns", "question=instruction"], "unknown name 'question'"),
    (["--dataset_name", "{tmp}/dolly.jsonl", "--columns", "instruction=question"],
     "row 0 has no column 'question' (mapped to instruction"),
    (["--dataset_name", "{tmp}/dolly.jsonl", "--dataset_format", "alpaca"], "row 0 has no column 'output'"),
    (["--dataset_name", "{tmp}/dolly.jsonl", "--dataset_format", "messages"], "row 0 has no column 'messages'"),
    (["--dataset_name", "{tmp}/ambiguous.jsonl"], "columns of several formats (dolly, messages)"),
    (["--dataset_name", "{tmp}/messages_text.jsonl"], "row 5: 'messages' is str, expected a list"),
    (["--dataset_name", "{tmp}/sharegpt.jsonl"], "message 0 is not {role, content} strings (got from, value)"),
    (["--dataset_name", "{tmp}/null_completion.jsonl"], "'completion' is NoneType, expected a list"),
    (["--dataset_name", "{tmp}/no_assistant.jsonl"],
     "no usable row in {tmp}/no_assistant.jsonl (30 no assistant turn, 20 roles out of order"),
    (["--dataset_name", "{tmp}/dolly.jsonl", "--dataset_config", "en"], "apply to hub datasets"),
    (["--dataset_name", "{tmp}/dolly.jsonl", "--dataset_split", "test"], "apply to hub datasets"),
    (["--dataset_name", "{tmp}", "--dataset_config", "nope"], "could not load dataset"),
    (["--system_prompt", "Be </s> brief"], "system_prompt contains the special string '</s>'"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_formats")
    for name, rows in BAD_FILES.items():
        _write(folder / name, rows)
    return folder


def _flags(flags, tmp):
    return ["--preset", "smoke", "--output_dir", str(tmp / "out")] + [f.format(tmp=tmp) for f in flags]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(c[0])[-40:] for c in BAD])
def test_bad_format_input_on_the_command_line(flags, message, tmp, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp / "cache"))
    assert main(["train", *_flags(flags, tmp)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert err[-1].startswith("error: ") and message.replace("{tmp}", str(tmp)) in err[-1], err[-1]
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(c[0])[-40:] for c in BAD])
def test_bad_format_input_in_python(flags, message, tmp, monkeypatch):
    pipeline = importlib.import_module("tinyllama_ft.training.sft")

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the error should be caught before the model loads")

    monkeypatch.setattr(pipeline, "load_model", no_model_loading)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp / "cache"))
    with pytest.raises(UserError) as error:
        train(parse_config(_flags(flags, tmp)))
    assert message.replace("{tmp}", str(tmp)) in str(error.value) and "\n" not in str(error.value)


def test_bad_preview_input_is_one_line(tmp, capsys):
    assert main(["preview", "--model_name_or_path", "tiny-random-llama", "--dataset_name", str(tmp / "dolly.jsonl"),
                 "--columns", "response=answer"]) == 2
    assert "has no column 'answer' (mapped to response" in capsys.readouterr().err.strip().splitlines()[-1]


# --- end to end on conversational rows ----------------------------------------------------------------

def _short_conversations(dolly_rows, n, seed=0):
    short = [r for r in dolly_rows if len(r["instruction"]) + len(r["context"]) + len(r["response"]) < 200]
    return [{"messages": m, "category": "multi-turn" if sum(x["role"] == "user" for x in m) > 1 else "single"}
            for m in conversations_from_dolly(short, n, seed)]


@pytest.mark.slow
def test_stories260k_learns_from_conversations(stories_dir, dolly_rows, tmp_path):
    """`train` on conversational rows of 1-3 real Dolly turns: the held-out loss over every assistant
    turn drops, and the run saves its system prompt."""
    path = _write(tmp_path / "chats.jsonl", _short_conversations(dolly_rows, 300))
    config = parse_config(
        model_name_or_path=stories_dir, dataset_name=path, output_dir=str(tmp_path / "run"), max_length=512,
        system_prompt="You are a helpful assistant.", train_size=200, eval_size=32, test_size=8, num_generate=4,
        max_new_tokens=16, max_steps=16, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        learning_rate=3e-3, logging_steps=8, eval_strategy="no", save_steps=1000, precision="fp32", lora_r=8,
        lora_alpha=16, gradient_checkpointing=False, tokenization_cache=False)
    metrics = train(config)
    print(f"stories260k on conversations: held-out loss {metrics['base_eval_loss']:.4f} -> {metrics['eval_loss']:.4f}"
          f" over {metrics['eval_tokens']} assistant tokens; per category "
          + ", ".join(f"{c} {v['eval_loss']:.3f}" for c, v in metrics["per_category"]["tuned"].items()))
    assert metrics["eval_tokens"] == metrics["base_eval_tokens"] > 1000
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.1
    assert set(metrics["per_category"]["tuned"]) == {"multi-turn", "single"}
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text(encoding="utf-8"))
    assert saved["system_prompt"] == "You are a helpful assistant." and saved["dataset_format"] == "auto"


def test_preview_of_conversations_through_the_command_line(tinyllama_tokenizer, tmp_path):
    from conftest import ROOT, as_printed
    import subprocess
    import sys

    rows = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[1:2]}, {"messages": TWO_TURNS[1:3]}]
    out = tmp_path / "p.jsonl"
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", "preview", "--model_name_or_path",
                             tinyllama_tokenizer.name_or_path, "--dataset_name", _write(tmp_path / "c.jsonl", rows),
                             "--system_prompt", "Be brief.", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["row"] for line in lines] == [0, 2]
    assert lines[0]["input_ids"] == SYSTEM + USER_HI + ASSISTANT + [10994, 29991, EOS] + USER_BYE + ASSISTANT + CIAO
    assert lines[1]["labels"] == [M] * len(SYSTEM + USER_HI + ASSISTANT) + [10994, 29991, EOS]
    assert "excluded row 1: no assistant turn: roles system, user" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "excluded 1 of 3 rows: 1 no assistant turn"


@pytest.mark.slow
def test_smoke_preset_on_conversations_through_the_command_line(tmp_path):
    """train, then generate with the run's saved system prompt (or another), from the shell."""
    from conftest import ROOT, as_printed
    import subprocess
    import sys

    from tinyllama_ft import generate, load_for_inference

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    out = tmp_path / "smoke"
    chats = SAMPLE_DATA.replace("sample.jsonl", "sample_messages.jsonl")
    cli("train", "--preset", "smoke", "--dataset_name", chats, "--system_prompt", "Answer in one sentence.",
        "--output_dir", out)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["eval_tokens"] > 0 and "rougeL" in metrics and metrics["rows"]["train"] == 24
    assert json.loads((out / "run_config.json").read_text(encoding="utf-8"))["system_prompt"] == "Answer in one sentence."
    model, tokenizer = load_for_inference(str(out), device="cpu")
    for flags, system_prompt in (([], "Answer in one sentence."), (["--system_prompt", ""], None)):
        printed = cli("generate", "--adapter", out, "--instruction", "Name a color.", "--max_new_tokens", 8, *flags)
        expected = generate(model, tokenizer, "Name a color.", max_new_tokens=8, system_prompt=system_prompt)
        assert printed.stdout == as_printed(expected["text"]) + "\n", flags


def test_readme_examples_are_the_formats_they_document(tinyllama_tokenizer):
    """Each two-line example in docs/DATA.md ("Your own data") loads as its format and trains what it says."""
    from conftest import ROOT

    page = (ROOT / "docs" / "DATA.md").read_text(encoding="utf-8")
    section = page.split("# Your own data", 1)[1].split("\n## ", 1)[0]
    examples = [[json.loads(line) for line in block.splitlines() if line.startswith("{")]
                for block in section.split("```json")[1:]]
    assert [len(lines) for lines in examples] == [2, 2, 2, 2, 2]  # the fifth: --columns' rows (test_docs.py)
    examples = examples[:4]
    for lines, fmt in zip(examples, ["dolly", "alpaca", "messages", "prompt_completion"]):
        conversations = to_conversations(lines)
        assert conversations == [to_conversation(line, fmt) for line in lines], fmt
        for conversation in conversations:
            item = encode_example(tinyllama_tokenizer, conversation)
            assert item["labels"][-3:] == item["input_ids"][-3:] and item["labels"][-1] == EOS
    dolly, alpaca = (encode_example(tinyllama_tokenizer, c) for c in (to_conversations(examples[0])[1],
                                                                      to_conversations(examples[1])[1]))
    assert dolly == alpaca
    one, two = (encode_example(tinyllama_tokenizer, c) for c in to_conversations(examples[2]))
    assert sum(label == EOS for label in two["labels"]) == 2  # both assistant turns trained
    prompt, completion = (encode_example(tinyllama_tokenizer, c) for c in to_conversations(examples[3]))
    assert sum(label == EOS for label in completion["labels"]) == 1  # only the completion trained


def test_generate_takes_conversations_and_a_system_prompt():
    from tinyllama_ft import generate
    from tinyllama_ft.model.loading import build_tiny_model, build_tiny_tokenizer

    model, tokenizer = build_tiny_model(), build_tiny_tokenizer()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    one = generate(model, tokenizer, conversation, max_new_tokens=6, progress=False)
    assert isinstance(one, dict) and [one] == generate(model, tokenizer, [conversation], max_new_tokens=6,
                                                       progress=False)
    with_system = generate(model, tokenizer, "Hi", max_new_tokens=6, system_prompt="Be brief.", progress=False)
    assert with_system == generate(model, tokenizer, conversation[:2], max_new_tokens=6, progress=False)
    assert with_system == generate(model, tokenizer, conversation[1:2], max_new_tokens=6, system_prompt="Be brief.",
                                   progress=False)
