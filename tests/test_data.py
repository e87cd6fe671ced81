"""Pure data functions on literal rows: formatting, validation, reading files, the split."""

import json

import pytest

from tinyllama_ft.data.prepare import length_stats, split_rows
from tinyllama_ft.data.formats import format_user_turn, load_rows, rename_columns, to_conversation, to_example, validate_rows
from tinyllama_ft.errors import UserError

ROW = {"instruction": "Who wrote Hamlet?", "context": "", "response": "William Shakespeare.", "category": "open_qa"}


def test_user_turn_is_the_instruction_alone_without_context():
    assert format_user_turn("Who wrote Hamlet?", "") == "Who wrote Hamlet?"
    assert format_user_turn("  Who wrote Hamlet?\n", "   ") == "Who wrote Hamlet?"


def test_user_turn_appends_the_context_under_a_label():
    assert format_user_turn("Summarize.", "Cats sleep a lot.") == "Summarize.\n\nContext:\nCats sleep a lot."


def test_row_becomes_a_conversational_prompt_completion_example():
    assert to_example(ROW) == {
        "prompt": [{"role": "user", "content": "Who wrote Hamlet?"}],
        "completion": [{"role": "assistant", "content": "William Shakespeare."}],
    }


@pytest.mark.parametrize("row, message", [
    ({"instruction": "a", "context": ""}, "no column 'response'"),
    ({"instruction": "a", "contxt": "", "response": "b"}, "no column 'context' but has 'contxt'"),
    ({"instruction": None, "context": "", "response": "b"}, "'instruction' is NoneType"),
    ({"instruction": "a", "context": 3, "response": "b"}, "'context' is int"),
    ({"instruction": "a", "context": "", "response": "  "}, "'response' is empty"),
    ({"instruction": "", "context": "", "response": "b"}, "'instruction' is empty"),
    ({"instruction": "a", "context": "", "response": "b", "category": 1}, "'category' is int"),
])
def test_validation_names_the_first_bad_row_and_column(row, message):
    with pytest.raises(UserError, match=rf"row 1.*{message}"):
        validate_rows([ROW, row])


def test_a_dolly_row_without_context_has_an_empty_context():
    """`context` is optional, as Alpaca's `input` is: the row is the one with `"context": ""`."""
    assert validate_rows([{"instruction": "a", "response": "b"}]) == "dolly"
    assert to_conversation({"instruction": "a", "response": "b"}) == \
        to_conversation({"instruction": "a", "context": "", "response": "b"})


@pytest.mark.parametrize("row, fmt", [
    (ROW, "dolly"), ({"instruction": "a", "input": "", "output": "b"}, "alpaca"), ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages"), ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": "b"}, "prompt_completion"),
])
def test_the_format_is_detected_from_the_columns(row, fmt):
    assert validate_rows([row, row]) == fmt


@pytest.mark.parametrize("row, fmt, message", [
    ({"instruction": "a", "input": ""}, "alpaca", "no column 'output'"),
    ({"instruction": "a", "input": 1, "output": "b"}, "alpaca", "'input' is int"),
    ({"instruction": "a", "output": " "}, "alpaca", "'output' is empty"),
    ({"messages": {"role": "user"}}, "messages", "'messages' is dict, expected a list"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "message 0 is not {role, content} strings"),
    ({"prompt": "a", "completion": 3}, "prompt_completion", "'completion' is int, expected a list"),
    ({"messages": [], "category": 2}, "messages", "'category' is int"),
])
def test_validation_of_each_format_names_the_row(row, fmt, message):
    good = {"alpaca": {"instruction": "a", "output": "b"},
            "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "prompt_completion": {"prompt": "a", "completion": "b"}}[fmt]
    with pytest.raises(UserError) as error:
        validate_rows([good, row], dataset_format=fmt)
    assert "row 1" in str(error.value) and message in str(error.value), str(error.value)


def test_columns_are_renamed_to_ours():
    rows = [{"q": "Hi", "a": "Hello", "id": 1}]
    assert rename_columns(rows, {"instruction": "q", "response": "a"}) == [{"id": 1, "instruction": "Hi", "response": "Hello"}]
    with pytest.raises(UserError, match="row 0 has no column 'ctx' \\(mapped to context"):
        rename_columns(rows, {"context": "ctx"})


def test_a_dolly_row_becomes_one_user_and_one_assistant_turn():
    assert to_conversation(dict(ROW, context="Plays."), "dolly", system_prompt="Be brief.") == {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Who wrote Hamlet?\n\nContext:\nPlays."},
                     {"role": "assistant", "content": "William Shakespeare."}], "category": "open_qa"}


def test_an_empty_dataset_is_rejected():
    with pytest.raises(UserError, match="no rows"):
        validate_rows([])


def test_jsonl_and_json_files_are_read(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n", encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps([ROW]), encoding="utf-8")
    assert load_rows(str(tmp_path / "d.jsonl")) == [ROW, ROW]
    assert load_rows(str(tmp_path / "d.json")) == [ROW]


def test_parquet_files_are_read(tmp_path):
    import datasets

    datasets.Dataset.from_list([ROW, ROW]).to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet")) == [ROW, ROW]


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(UserError, match="invalid JSON on line 2"):
        load_rows(str(tmp_path / "d.jsonl"))


@pytest.mark.parametrize("name, message", [("missing.jsonl", "does not exist"), ("d.txt", "not .json")])
def test_bad_paths_get_a_clear_error(tmp_path, name, message):
    (tmp_path / "d.txt").write_text("a,b\n", encoding="utf-8")  # (a .csv with a header is read)
    with pytest.raises(UserError, match=message):
        load_rows(str(tmp_path / name))


def _rows(counts: dict[str, int]) -> list[dict]:
    return [dict(ROW, category=cat) for cat, n in counts.items() for _ in range(n)]


def test_split_is_disjoint_sized_and_deterministic():
    rows = _rows({"a": 60, "b": 30, "c": 10})
    split = split_rows(rows, list(range(100)), train_size=50, eval_size=10, test_size=10, seed=1)
    assert [len(split[k]) for k in ("train", "validation", "test")] == [50, 10, 10]
    assert not set(split["train"]) & set(split["validation"]) | set(split["train"]) & set(split["test"])
    assert not set(split["validation"]) & set(split["test"])
    assert split == split_rows(rows, list(range(100)), 50, 10, 10, seed=1)
    assert split != split_rows(rows, list(range(100)), 50, 10, 10, seed=2)


def test_split_is_stratified_by_category():
    rows = _rows({"a": 600, "b": 300, "c": 100})
    split = split_rows(rows, list(range(1000)), train_size=500, eval_size=100, test_size=100, seed=0)
    for part, size in (("train", 500), ("validation", 100), ("test", 100)):
        counts = {cat: sum(rows[i]["category"] == cat for i in split[part]) for cat in "abc"}
        assert counts == {"a": size * 6 // 10, "b": size * 3 // 10, "c": size // 10}


def test_split_uses_only_the_given_indices():
    rows = _rows({"a": 20})
    split = split_rows(rows, list(range(0, 20, 2)), train_size=6, eval_size=2, test_size=2, seed=0)
    assert all(i % 2 == 0 for part in split.values() for i in part)


def test_split_sizes_that_do_not_fit_are_rejected():
    rows = _rows({"a": 20})
    with pytest.raises(UserError, match="eval_size \\+ test_size"):
        split_rows(rows, list(range(20)), 5, 10, 10, 0)
    with pytest.raises(UserError, match="train_size 15 is larger than the 10 rows"):
        split_rows(rows, list(range(20)), 15, 5, 5, 0)


def test_length_stats():
    stats = length_stats([1, 2, 3, 4, 100], max_length=50)
    assert stats["mean"] == 22 and stats["median"] == 3 and stats["max"] == 100 and stats["over_max_length"] == 1
