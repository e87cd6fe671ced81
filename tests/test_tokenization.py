"""Loss masks on literal ids and on every real Dolly row, with the real TinyLlama tokenizer."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tinyllama_ft.data.encoding import IGNORE_INDEX, encode_example, encode_prompt, encode_rows
from tinyllama_ft.data.formats import to_example
from tinyllama_ft.errors import UserError

BOS, EOS = 1, 2


def test_literal_ids_and_mask(tinyllama_tokenizer):
    example = to_example({"instruction": "Hi there", "context": "", "response": "Hello!"})
    item = encode_example(tinyllama_tokenizer, example)
    # <s> <|user|>\nHi there</s>\n<|assistant|>\n   then   Hello ! </s>
    prompt = [BOS, 529, 29989, 1792, 29989, 29958, 13, 18567, 727, 2, 13, 29966, 29989, 465, 22137, 29989, 29958, 13]
    assert item["input_ids"] == prompt + [10994, 29991, EOS]
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + [10994, 29991, EOS]


def test_every_real_dolly_row(tinyllama_tokenizer, dolly_rows):
    """Prompt ids equal the ids inference feeds; labels cover exactly the response and its EOS."""
    tok = tinyllama_tokenizer
    encoded, excluded, _ = encode_rows(tok, dolly_rows, max_length=10**6)
    assert len(encoded) + len(excluded) == len(dolly_rows) and len(encoded) > 1000
    for index, item in encoded.items():
        row = dolly_rows[index]
        prompt_ids = encode_prompt(tok, to_example(row)["prompt"])
        n = len(prompt_ids)
        assert item["input_ids"][:n] == prompt_ids and item["input_ids"][0] == BOS
        assert item["input_ids"].count(BOS) == 1
        assert set(item["labels"][:n]) == {IGNORE_INDEX}
        trained = item["labels"][n:]
        assert trained == item["input_ids"][n:] and IGNORE_INDEX not in trained
        assert trained[-1] == EOS and trained.count(EOS) == 1
        assert tok.decode(trained[:-1]) == row["response"].strip()
    for why in excluded.values():
        assert "special string" in why


def test_response_tokens_are_a_minority_of_dolly(tinyllama_tokenizer, dolly_rows):
    """Why the mask matters: on Dolly most tokens are prompt tokens."""
    encoded, _, _ = encode_rows(tinyllama_tokenizer, dolly_rows, max_length=10**6)
    total = sum(len(e["input_ids"]) for e in encoded.values())
    trained = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in encoded.values())
    assert 0.35 < trained / total < 0.5


def test_rows_over_max_length_are_dropped_and_counted(tinyllama_tokenizer, dolly_rows):
    encoded, excluded, lengths = encode_rows(tinyllama_tokenizer, dolly_rows[:200], max_length=256)
    assert all(len(e["input_ids"]) <= 256 for e in encoded.values())
    too_long = {i for i, n in lengths.items() if n > 256}
    assert too_long and too_long == {i for i, why in excluded.items() if "max_length" in why}
    assert set(encoded) == set(lengths) - too_long


@pytest.mark.parametrize("text", ["a </s> b", "<s>start", "x <|assistant|>\ny", "<unk>"])
def test_special_token_strings_are_rejected_not_tokenized(tinyllama_tokenizer, text):
    for row in ({"instruction": text, "context": "", "response": "ok"},
                {"instruction": "ok", "context": text, "response": "ok"},
                {"instruction": "ok", "context": "", "response": text}):
        with pytest.raises(UserError, match="special string"):
            encode_example(tinyllama_tokenizer, to_example(row))


def test_trl_collator_keeps_eos_trained_although_pad_is_eos():
    """The seed's trap: pad == EOS. TRL pads labels with -100 and keeps ours, so EOS stays a label."""
    collator = DataCollatorForLanguageModeling(pad_token_id=EOS)
    batch = collator([{"input_ids": [BOS, 5, 6, EOS], "labels": [-100, -100, 6, EOS]},
                      {"input_ids": [BOS, 7, EOS], "labels": [-100, 7, EOS]}])
    assert batch["input_ids"].tolist() == [[BOS, 5, 6, EOS], [BOS, 7, EOS, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, 6, EOS], [-100, 7, EOS, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert torch.equal(batch["labels"] == EOS, torch.tensor([[0, 0, 0, 1], [0, 0, 1, 0]]).bool())


def test_tokenization_cache_gives_the_same_encodings_without_tokenizing(tinyllama_tokenizer, dolly_rows, tmp_path,
                                                                         monkeypatch, caplog):
    import copy
    import logging

    import tinyllama_ft.data.encoding as encoding

    rows = dolly_rows[:100] + [dict(dolly_rows[0], response="Done.</s>")]  # one excluded for its special string
    fresh = encode_rows(tinyllama_tokenizer, rows, max_length=256)
    assert fresh[1] and encode_rows(tinyllama_tokenizer, rows, 256, cache_dir=tmp_path) == fresh
    (cached,) = tmp_path.iterdir()
    assert cached.suffix == ".npz" and cached == encoding.encoding_cache_path(tinyllama_tokenizer, rows, tmp_path)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds these rows")

    monkeypatch.setattr(encoding, "encode_example", no_tokenizing)
    assert encode_rows(tinyllama_tokenizer, rows, 256, cache_dir=tmp_path) == fresh
    longer = encode_rows(tinyllama_tokenizer, rows, 10**6, cache_dir=tmp_path)  # any max_length, same file
    assert longer[0].keys() > fresh[0].keys() and longer[2] == fresh[2]
    with pytest.raises(AssertionError, match="tokenized although"):  # other rows: a miss
        encode_rows(tinyllama_tokenizer, rows[:-1] + [dict(rows[-1], response="Done.")], 256, cache_dir=tmp_path)
    monkeypatch.undo()

    other = copy.deepcopy(tinyllama_tokenizer)  # another chat template: another file
    other.chat_template = tinyllama_tokenizer.chat_template.replace("<|assistant|>", "<|assistant|> ")
    assert encoding.encoding_cache_path(other, rows, tmp_path) != cached

    cached.write_bytes(cached.read_bytes()[:1000])  # truncated: read as a miss, said, and rewritten
    with caplog.at_level(logging.WARNING, logger="tinyllama_ft.data.encoding"):
        assert encode_rows(tinyllama_tokenizer, rows, 256, cache_dir=tmp_path) == fresh
    assert "ignoring unreadable tokenization cache" in caplog.text
    assert encode_rows(tinyllama_tokenizer, rows, 256, cache_dir=tmp_path) == fresh
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary files left behind
