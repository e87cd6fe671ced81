"""Preference pairs: TRL's standard preference formats -> one pair shape -> token ids, refused by reason.

Accepted rows (TRL's "preference" dataset type), as strings or as conversations:

* explicit prompt: ``prompt``, ``chosen``, ``rejected`` (``prompt`` a string or a list of messages; ``chosen``
  and ``rejected`` a string, one assistant message, or the whole conversation, prompt included, as in
  HuggingFaceH4/orca_dpo_pairs);
* implicit prompt: ``chosen``, ``rejected`` only, the prompt being their shared beginning (TRL's
  `extract_prompt`).

An optional ``system`` column (Intel/orca_dpo_pairs) becomes the system turn; ``category`` is kept for the split.
Every row becomes ``{"prompt": [messages], "chosen": str, "rejected": str, "category": str}`` (`to_pair`) and is
encoded as `encode_pair` says: both sequences are ``encode_prompt(prompt)`` followed by the response ids and
the EOS, exactly what SFT trains on and what `generate`, `chat`, `serve` and the GGUF feed, so DPO moves the
model the user runs. Pairs that cannot be used are dropped and counted by reason, as SFT rows are.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from trl.data_utils import extract_prompt

from ..errors import UserError
from ..settings.columns import parse_columns
from .encoding import IGNORE_INDEX, encode_example
from .formats import _read_file, clean_messages, format_user_turn, read_dataset, rename_columns, with_system_prompt
from .prepare import exclusion_counts, split_rows

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "system", "category")
SFT_COLUMNS = ("instruction", "response", "output", "messages", "completion")


# --- load ----------------------------------------------------------------------------------------

def load_pairs(dataset_name: str, dataset_config: str | None = None, dataset_split: str = "train",
               columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet file, a dataset folder, or split `dataset_split` of a hub
    dataset; columns renamed by `columns` (ours -> the file's) and checked to be preference rows."""
    path = Path(dataset_name)
    if path.is_file() or path.suffix in (".json", ".jsonl", ".parquet"):
        if dataset_config or (dataset_split or "train") not in ("train",):
            raise UserError(f"dataset_config and dataset_split apply to hub datasets, and {dataset_name} is a local "
                            "file (one split): drop them, or pass a hub id or dataset folder")
        rows = _read_file(path)
    else:
        rows = read_dataset(dataset_name, dataset_config, dataset_split)
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{dataset_name} has no rows: pass a file with at least one preference pair")
    rows = rename_columns(rows, columns or {}, source=dataset_name)
    check_pair_columns(rows, dataset_name)
    return rows


def parse_pair_columns(value) -> dict[str, str]:
    """`--columns` for pairs: `prompt=question,chosen=better,rejected=worse` (or JSON / a YAML mapping)."""
    return parse_columns(value, PAIR_COLUMNS, example="prompt=question,chosen=better")


def check_pair_columns(rows: list, source: str) -> None:
    """The first row must be a preference pair (`chosen` and `rejected`); SFT rows get their own hint."""
    first = rows[0]
    if not isinstance(first, dict):
        raise UserError(f"{source} row 0 is not an object with the columns prompt, chosen, rejected")
    missing = [c for c in ("chosen", "rejected") if c not in first]
    if not missing:
        return
    names = ", ".join(map(str, first)) or "none"
    if any(c in first for c in SFT_COLUMNS):
        raise UserError(f"{source} holds SFT rows (columns: {names}), not preference pairs: DPO needs prompt, chosen "
                        "and rejected columns (train fine-tunes on SFT rows; --columns chosen=YOUR_COLUMN maps names)")
    raise UserError(f"{source} row 0 has no column {missing[0]!r} (columns: {names}): DPO needs prompt, chosen and "
                    f"rejected; map yours with --columns {missing[0]}=YOUR_COLUMN")


# --- one pair shape --------------------------------------------------------------------------------

def to_pair(row: dict, system_prompt: str | None = None) -> dict:
    """A preference row as ``{"prompt": [messages], "chosen": str, "rejected": str, "category": str}``.
    Raises `UserError` (``reason: detail``) for a pair that cannot be used."""
    for side in ("chosen", "rejected"):
        value = row.get(side)
        if value is None:
            raise UserError(f"missing {side}")
        messages = value if isinstance(value, list) else []
        if not isinstance(value, (str, list)) or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"bad {side}: {_kind_of(value)}, not text or a list of {{role, content}} messages")
        if not _has_text(value):
            raise UserError(f"empty {side}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list) and _holds_prompt(chosen, rejected, prompt):
        split = extract_prompt({"chosen": chosen, "rejected": rejected})  # the shared beginning is the prompt
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
    elif prompt is None:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise UserError("missing prompt: chosen and rejected are single turns and no prompt column is given")
        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
    messages = _as_messages(prompt, "user", "prompt")
    if isinstance(row.get("system"), str) and row["system"].strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": row["system"].strip()}, *messages]
    pair = {"prompt": with_system_prompt(messages, system_prompt), "chosen": _response(chosen, "chosen"),
            "rejected": _response(rejected, "rejected"), "category": str(row.get("category") or "")}
    for side in ("chosen", "rejected"):
        if not pair[side]:
            raise UserError(f"empty {side}")
    if pair["chosen"] == pair["rejected"]:
        raise UserError("chosen == rejected: the two responses are identical")
    return pair


def _kind_of(value) -> str:
    """What a value is, for a message: `an int`, `a list of int`, `an empty list`."""
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {' and '.join(kinds)}" if kinds else "an empty list"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _has_text(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and any(isinstance(m, dict) and str(m.get("content") or "").strip() for m in value)


def _holds_prompt(chosen: list, rejected: list, prompt) -> bool:
    """Conversations that carry the prompt themselves (more than the one assistant turn)."""
    return prompt is None or len(chosen) > 1 or len(rejected) > 1


def _as_messages(value, role: str, name: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"empty {name}")
        return [{"role": role, "content": value.strip()}]
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise UserError(f"bad {name}: {_kind_of(value)}, not text or a list of {{role, content}} messages")
    return clean_messages(value)


def _response(value, side: str) -> str:
    """The text of a response: a string, or one assistant message."""
    if isinstance(value, str):
        return value.strip()
    messages = _as_messages(value, "assistant", side)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"bad {side}: expected one assistant turn after the prompt, got {roles}")
    return messages[0]["content"]


# --- encode ---------------------------------------------------------------------------------------

def encode_pair(tokenizer, pair: dict) -> dict:
    """``prompt_ids`` (`encode_prompt` of the prompt: one BOS, the chat template, the generation prompt),
    ``chosen_ids`` and ``rejected_ids`` (each response's ids and the EOS that closes it, nothing after):
    each sequence is encoded by SFT's own `encode_example`, so prompt + response is what SFT trains on.
    Raises `UserError` for special-token text or a conversation `check_turns` refuses."""
    out = {}
    for side in ("chosen", "rejected"):
        messages = [*pair["prompt"], {"role": "assistant", "content": pair[side]}]
        encoded = encode_example(tokenizer, {"messages": messages, "train_from": len(pair["prompt"])})
        start = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
        prompt_ids = encoded["input_ids"][:start]
        if out.setdefault("prompt_ids", prompt_ids) != prompt_ids:
            raise UserError("the chat template renders the prompt differently before the two responses")
        out[f"{side}_ids"] = encoded["input_ids"][start:]
    return out


def pair_examples(encoded: dict) -> tuple[dict, dict]:
    """(chosen, rejected) as SFT examples (`input_ids`, `labels` on the response and its EOS only)."""
    prompt = encoded["prompt_ids"]
    return tuple({"input_ids": prompt + encoded[f"{side}_ids"],
                  "labels": [IGNORE_INDEX] * len(prompt) + encoded[f"{side}_ids"]} for side in ("chosen", "rejected"))


def encode_pairs(tokenizer, rows: list[dict], max_length: int, system_prompt: str | None = None
                 ) -> tuple[dict[int, dict], dict[int, str], list[dict | None]]:
    """({row: encoded pair}, {row: why it was refused}, the pairs `to_pair` made (None where it refused)).
    A pair is refused when either sequence (prompt + response + EOS) is longer than `max_length`: it is
    dropped, never truncated (a truncated response loses its EOS)."""
    encoded, excluded, pairs = {}, {}, []
    for index, row in enumerate(rows):
        try:
            pair = to_pair(row, system_prompt) if isinstance(row, dict) else None
            if pair is None:
                raise UserError("bad row: not an object")
            pairs.append(pair)
            item = encode_pair(tokenizer, pair)
        except UserError as error:
            if len(pairs) == index:
                pairs.append(None)
            excluded[index] = str(error)
            continue
        longest = len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"]))
        if longest > max_length:
            excluded[index] = f"{longest} tokens > max_length {max_length}"
        else:
            encoded[index] = item
    return encoded, excluded, pairs


# --- the data stage --------------------------------------------------------------------------------

@dataclass
class Pairs:
    """The rows, their pairs, their encodings, what was refused and why, and the split (row indices):
    `train` for DPO, `validation` held out for the before/after preference metrics."""

    rows: list[dict]
    pairs: list[dict | None]
    encoded: dict[int, dict]
    excluded: dict[int, str]
    split: dict[str, list[int]] = field(default_factory=dict)

    def examples(self, part: str) -> list[dict]:
        return [self.encoded[i] for i in self.split[part]]

    def dataset(self, part: str):
        from datasets import Dataset

        return Dataset.from_list([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                  for e in self.examples(part)])

    def stats(self) -> dict:
        return {"pairs": len(self.rows), "usable": len(self.encoded), "excluded": len(self.excluded),
                "excluded_by_reason": exclusion_counts(self.excluded),
                "rows": {part: len(idx) for part, idx in self.split.items()}}


def prepare_pairs(config, tokenizer) -> Pairs:
    """Load, convert, encode and split the preference pairs of `config` (a `DpoConfig`); pairs that
    cannot be used are dropped and counted by reason (one line in the log), none usable is an error."""
    rows = load_pairs(config.dataset_name, config.dataset_config, config.dataset_split, config.columns)
    wanted = config.train_size + config.eval_size
    if wanted > len(rows):
        raise UserError(f"train_size + eval_size = {wanted} but {config.dataset_name} has only {len(rows)} pairs: "
                        "lower the sizes")
    encoded, excluded, pairs = encode_pairs(tokenizer, rows, config.max_length, config.system_prompt)
    reasons = exclusion_counts(excluded)
    counted = ", ".join(f"{n} {kind}" for kind, n in reasons.items())
    if not encoded:
        first = next(iter(excluded))
        raise UserError(f"no usable pair in {config.dataset_name} ({counted}; first: row {first}, {excluded[first]}): "
                        "fix the pairs" + (" or raise max_length" if set(reasons) == {"over max_length"} else ""))
    if excluded:
        log.info("excluded %d of %d pairs: %s (first: row %d, %s)", len(excluded), len(rows), counted,
                 *next(iter(excluded.items())))
    categories = [p or {"category": ""} for p in pairs]
    split = split_rows(categories, sorted(encoded), config.train_size, config.eval_size, 0, config.seed)
    split.pop("test")
    return Pairs(rows, pairs, encoded, excluded, split)


def degrade_first_half(response: str) -> str:
    """A worse answer built from a good one: its first half (by words), which stops too soon."""
    words = response.split()
    return " ".join(words[: max(1, len(words) // 2)])


def pairs_from_dolly(rows: list[dict], seed: int = 0) -> list[dict]:
    """Preference pairs from Dolly rows (TRL's conversational explicit-prompt format): the reference
    response chosen, and rejected either its first half (even rows) or another row's response (odd
    rows). What `tinyllama_ft/samples/sample_pairs.jsonl` was made with."""
    rng = random.Random(seed)
    out = []
    for index, row in enumerate(rows):
        chosen = row["response"].strip()
        if index % 2 == 0:
            rejected, kind = degrade_first_half(chosen), "first_half"
        else:
            other = rows[(index + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
            rejected, kind = other["response"].strip(), "other_row"
        out.append({"prompt": [{"role": "user", "content": format_user_turn(row["instruction"], row.get("context", ""))}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "category": row.get("category", ""), "rejected_kind": kind})
    return out
