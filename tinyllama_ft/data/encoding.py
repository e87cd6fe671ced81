"""A conversation -> token ids and labels, exactly as inference feeds them; cached between runs.

Token ids come from the tokenizer's own chat template with one BOS first: before each assistant turn
they are exactly what inference feeds at that point of the conversation (`encode_prompt`); labels cover
every trained assistant turn and the EOS that closes it, -100 everywhere else.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import formats
from .formats import check_turns, to_example

log = logging.getLogger(__name__)

ROLE_MARKERS = ("<|user|>", "<|assistant|>", "<|system|>")

IGNORE_INDEX = -100


def find_special_text(text: str, tokenizer) -> str | None:
    """The first special-token or role-marker string inside `text`, if any."""
    for marker in (*tokenizer.all_special_tokens, *ROLE_MARKERS):
        if marker and marker in text:
            return marker
    return None


def check_system_prompt(system_prompt: str | None, tokenizer) -> None:
    """Raise a `UserError` for a system prompt holding a special-token string (every row would fail)."""
    marker = find_special_text(system_prompt or "", tokenizer)
    if marker:
        raise UserError(f"system_prompt contains the special string {marker!r}, which would be read as a control "
                        "token: remove it")


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt exactly as inference feeds them: BOS, then the chat template with
    the generation prompt. Raises `UserError` for text that holds special-token strings."""
    for message in messages:
        marker = find_special_text(message["content"], tokenizer)
        if marker:
            raise UserError(f"text contains the special string {marker!r}, which would be read as a "
                            "control token; remove or escape it")
    ids = _chat_ids(tokenizer, messages, add_generation_prompt=True)
    return ids


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # verbose=False: no "longer than the specified maximum" warning, as over-long rows are dropped and counted
    # (`encode_rows`) and a prompt too long for the context is refused (`chat`, `serve`)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True, tokenizer_kwargs={"verbose": False})["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def encode_example(tokenizer, example: dict) -> dict:
    """`input_ids` and `labels` of one example: a conversation (`messages`; every assistant turn from
    `train_from`, default 0, is trained) or TRL's prompt-completion (`prompt`, `completion`: the
    completion's assistant turns are trained). Before each trained turn the ids are exactly
    `encode_prompt` of the conversation so far, what inference and `chat` feed; the labels cover each
    trained turn's content and the EOS that closes it, and are -100 everywhere else. Raises `UserError`
    for a conversation `check_turns` refuses or text with special-token strings."""
    messages, train_from = conversation_of(example)
    check_turns(messages, train_from)
    ids, labels = [], []
    for end, message in enumerate(messages):
        if message["role"] != "assistant" or end < train_from:
            continue
        prompt_ids = encode_prompt(tokenizer, messages[:end])
        if prompt_ids[: len(ids)] != ids:
            raise UserError("the chat template renders earlier turns differently once more turns follow; use a "
                            "template that renders a conversation as the concatenation of its turns")
        marker = find_special_text(message["content"], tokenizer)
        if marker:
            raise UserError(f"response contains the special string {marker!r}")
        full_ids = _chat_ids(tokenizer, messages[: end + 1], add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise UserError("the chat template renders the prompt differently with and without the answer; "
                            "use a template whose generation prompt is a prefix of the conversation")
        completion = full_ids[len(prompt_ids):]
        # Keep the response up to and including the EOS that closes it; drop what the template adds after.
        completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
        labels += [IGNORE_INDEX] * (len(prompt_ids) - len(ids)) + completion
        ids = prompt_ids + completion
    return {"input_ids": ids, "labels": labels}


def conversation_of(example: dict) -> tuple[list[dict], int]:
    """(the whole conversation, the index of its first trained message) of either example shape."""
    if "messages" in example:
        return example["messages"], example.get("train_from", 0)
    return example["prompt"] + example["completion"], len(example["prompt"])


def encode_rows(tokenizer, rows: list[dict], max_length: int, cache_dir: str | Path | None = None
                ) -> tuple[dict[int, dict], dict[int, str], dict[int, int]]:
    """Encode every row (a Dolly row or a `to_conversation` example); return ({row index: encoded}, {row index: why it was excluded},
    {row index: token length}, the last also for rows dropped for length).

    Rows longer than `max_length` are dropped, not truncated: a truncated response loses the EOS
    the model must learn; a conversation is dropped whole. Rows with special-token strings and
    conversations `check_turns` refuses are dropped too, each with its reason.

    With `cache_dir`, the encodings are kept there, keyed by the rows, the tokenizer, its chat
    template and the code of this module and `formats`, so a second run on the same data skips
    tokenizing (any `max_length`); see `encoding_cache_path`."""
    items, errors = _encode_all(tokenizer, rows, cache_dir)
    encoded, excluded, lengths = {}, dict(errors), {}
    for index, item in items.items():
        lengths[index] = len(item["input_ids"])
        if len(item["input_ids"]) > max_length:
            excluded[index] = f"{len(item['input_ids'])} tokens > max_length {max_length}"
        else:
            encoded[index] = item
    return encoded, dict(sorted(excluded.items())), lengths


def encoding_cache_path(tokenizer, rows: list[dict], cache_dir: str | Path) -> Path | None:
    """Where the encodings of `rows` by `tokenizer` are cached: a file named by a SHA-256 of what
    decides them (None for a tokenizer without a serialisable fast backend)."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    code = inspect.getsource(sys.modules[__name__]) + inspect.getsource(formats)  # how rows become ids
    for part in (code, transformers.__version__, backend.to_str(), str(tokenizer.chat_template),
                 json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
                 json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return Path(cache_dir) / f"encoded-{digest.hexdigest()[:32]}.npz"


def _encode_all(tokenizer, rows: list[dict], cache_dir) -> tuple[dict[int, dict], dict[int, str]]:
    from tqdm.auto import tqdm

    path = encoding_cache_path(tokenizer, rows, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            items, errors = _read_encodings(path)
            log.info("tokenized rows read from %s", path)
            return items, errors
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            log.warning("ignoring unreadable tokenization cache %s (%s): tokenizing again", path, error)
    items, errors = {}, {}
    for index, row in enumerate(tqdm(rows, desc="tokenizing", leave=False, mininterval=2)):
        try:
            items[index] = encode_example(tokenizer, row if "messages" in row else to_example(row))
        except UserError as error:
            errors[index] = str(error)
    if path is not None:
        try:
            _write_encodings(path, items, errors)
        except OSError as error:
            log.warning("could not write the tokenization cache %s (%s): the next run tokenizes again", path, error)
    return items, errors


def _write_encodings(path: Path, items: dict[int, dict], errors: dict[int, str]) -> None:
    """One .npz (no pickles), written to a temporary name and renamed: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(items)
    flat = {key: np.asarray([t for i in order for t in items[i][key]], dtype=np.int32)
            for key in ("input_ids", "labels")}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.savez(file, rows=np.asarray(order, dtype=np.int64),
                 offsets=np.cumsum([0] + [len(items[i]["input_ids"]) for i in order], dtype=np.int64),
                 errors=np.asarray(json.dumps({str(i): e for i, e in errors.items()})), **flat)
    os.replace(temporary, path)


def _read_encodings(path: Path) -> tuple[dict[int, dict], dict[int, str]]:
    with np.load(path, allow_pickle=False) as data:
        rows, offsets = data["rows"].tolist(), data["offsets"].tolist()
        input_ids, labels = data["input_ids"].tolist(), data["labels"].tolist()
        errors = {int(i): e for i, e in json.loads(str(data["errors"])).items()}
    if len(offsets) != len(rows) + 1 or offsets[-1] != len(input_ids) or len(labels) != len(input_ids):
        raise ValueError("inconsistent arrays")
    items = {row: {"input_ids": input_ids[a:b], "labels": labels[a:b]}
             for row, a, b in zip(rows, offsets[:-1], offsets[1:])}
    return items, errors
