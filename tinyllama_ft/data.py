"""Rows of any supported format -> one conversation shape -> token ids and labels, split and measured.

Formats, detected from the columns (or forced with `dataset_format`):

* Dolly: ``instruction``, ``context``, ``response`` (``category`` optional);
* Alpaca: ``instruction``, ``input`` (optional), ``output``: the same example as the equivalent Dolly row;
* conversational (``messages``: ``{role, content}`` with roles system, user, assistant), TRL's format;
* prompt-completion (``prompt``, ``completion``: strings or message lists), TRL's format.

Every row becomes ``{"messages": [...], "category": str}`` (`to_conversation`), a conversation whose last
message is the assistant turn evaluation generates; prompt-completion rows add ``train_from``, the index
of the completion's first message, as only the completion is trained. A Dolly or Alpaca row's user turn
(used at training and inference alike) is::

    {instruction}

    Context:
    {context}

(the last two lines only when the context is not empty). The system prompt, when set, is the first
message of every conversation that has none. Token ids come from the tokenizer's own chat template with
one BOS first: before each assistant turn they are exactly what inference feeds at that point of the
conversation (`encode_prompt`); labels cover every trained assistant turn and the EOS that closes it,
-100 everywhere else.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import sys
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("instruction", "context", "response")
FORMATS = {"dolly": ("instruction", "context", "response"), "alpaca": ("instruction", "input", "output"),
           "messages": ("messages",), "prompt_completion": ("prompt", "completion")}
DETECTED_BY = {"dolly": ("instruction", "context", "response"), "alpaca": ("instruction", "output"),
               "messages": ("messages",), "prompt_completion": ("prompt", "completion")}
COLUMN_NAMES = ("instruction", "context", "response", "input", "output", "category", "messages", "prompt",
                "completion")
ROLES = ("system", "user", "assistant")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")  # what datasets reads from a folder
ROLE_MARKERS = ("<|user|>", "<|assistant|>", "<|system|>")
IGNORE_INDEX = -100


# --- load and validate ---------------------------------------------------------------------------

def load_rows(dataset_name: str, dataset_config: str | None = None, dataset_split: str = "train",
              columns: dict[str, str] | None = None, dataset_format: str = "auto") -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet file, or of split `dataset_split` of a hub dataset (or of a
    local dataset folder) with configuration `dataset_config`; columns renamed by `columns` (this
    project's name -> the file's name) and validated for `dataset_format` (see `detect_format`)."""
    path = Path(dataset_name)
    if path.is_dir():  # a dataset folder (data files, or a hub dataset's layout): datasets reads it
        if not any(p.suffix in DATA_FILE_SUFFIXES for p in path.rglob("*") if p.is_file()):
            raise UserError(f"dataset {path} is a folder without .json, .jsonl, .parquet, .csv or .arrow files: "
                            "pass a .json, .jsonl or .parquet file, or a folder of them")
        rows = _read_hub(dataset_name, dataset_config, dataset_split)
    elif path.suffix in (".json", ".jsonl", ".parquet") or path.exists():
        if dataset_config or (dataset_split or "train") != "train":
            raise UserError(f"dataset_config and dataset_split apply to hub datasets, and {dataset_name} is a local "
                            "file (one split): drop them, or pass a hub id or dataset folder")
        rows = _read_file(path)
    else:
        rows = _read_hub(dataset_name, dataset_config, dataset_split)
    rows = rename_columns(rows, columns or {}, source=dataset_name)
    validate_rows(rows, source=dataset_name, dataset_format=dataset_format)
    return rows


def _read_file(path: Path) -> list[dict]:
    """Rows of a local file. JSON may be one array or one object a line (either extension), in
    UTF-8 with or without a BOM and with any line endings (what Windows editors write)."""
    if path.is_dir():
        raise UserError(f"dataset {path} is a folder: pass a .json, .jsonl, .csv or .parquet file inside it")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist: check --dataset_name")
    suffix = path.suffix.lower()  # rows.JSONL is rows.jsonl
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".json", ".jsonl", ".csv"):
        raise UserError(f"dataset file {path} is not .json, .jsonl, .csv or .parquet: convert it or rename it")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    if suffix == ".csv":
        return _read_csv(path, text)
    if text.lstrip().startswith("[") or _one_document(text):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
        if isinstance(rows, dict):
            raise UserError(f"{path} holds one JSON object, not rows: write a list of rows, or one row a line "
                            f"(keys: {', '.join(list(rows)[:5]) or 'none'})")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}: invalid JSON on line {number}: {error.msg}") from None
    return rows


def _read_csv(path: Path, text: str) -> list[dict]:
    """Rows of a CSV file with a header line (what a spreadsheet saves); every value is text."""
    import csv
    import io

    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise UserError(f"{path}: not a readable CSV file ({error}): save it as CSV with a header line") from None
    for number, row in enumerate(rows):
        if None in row or None in row.values():
            raise UserError(f"{path}: row {number} (line {number + 2}) has {'more' if None in row else 'fewer'} "
                            "cells than the header: fix that line")
    return rows


def _one_document(text: str) -> bool:
    """A single (possibly multi-line) JSON object, rather than one object a line."""
    stripped = text.strip()
    if not stripped.startswith("{") or "\n" not in stripped:
        return False
    try:
        json.loads(stripped)
    except json.JSONDecodeError:
        return False
    return True


def _read_parquet(path: Path) -> list[dict]:
    import datasets

    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"PAR1":
        raise UserError(f"{path} is not a Parquet file (it does not start with PAR1): convert it, or name it "
                        "after what it holds (.json / .jsonl)")
    try:
        return datasets.Dataset.from_parquet(str(path)).to_list()
    except Exception as error:  # a damaged file: pyarrow's many error types, one line
        raise UserError(f"{path} is not a readable Parquet file ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}): write it again") from None


def _read_hub(name: str, config_name: str | None = None, split: str = "train") -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, config_name or None, split=split or "train").to_list()
    except Exception as error:  # network, unknown id, config or split, no access: one line, with the cause
        raise UserError(f"could not load dataset {name!r} (configuration {config_name or 'default'}, split "
                        f"{split or 'train'}) ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); pass a local .jsonl file "
                        "or check the id, --dataset_config, --dataset_split and your network") from None


def parse_columns(value) -> dict[str, str]:
    """`columns` as {this project's column name: the dataset's column name}, from a dict (YAML), JSON
    (`{"instruction": "question"}`) or `instruction=question,response=answer`."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise UserError(f"columns: invalid JSON ({error.msg}): write instruction=question,response=answer") from None
    if isinstance(value, str):
        pairs = [item.strip() for item in value.split(",") if item.strip()]
        bad = [item for item in pairs if item.count("=") != 1 or not all(p.strip() for p in item.split("="))]
        if bad:
            raise UserError(f"columns: {bad[0]!r} is not NAME=COLUMN: write instruction=question,response=answer")
        value = dict((k.strip(), v.strip()) for k, v in (item.split("=") for item in pairs))
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UserError(f"columns must map names to column names, got {value!r}: write instruction=question")
    unknown = sorted(set(value) - set(COLUMN_NAMES))
    if unknown:
        raise UserError(f"columns: unknown name {unknown[0]!r}: map one of {', '.join(COLUMN_NAMES)} "
                        "(NAME=YOUR_COLUMN)")
    return dict(value)


def rename_columns(rows: list, columns: dict[str, str], source: str = "dataset") -> list:
    """Rows with the dataset's columns renamed to this project's names (`columns`: ours -> theirs)."""
    if not columns or not isinstance(rows, list):
        return rows
    renamed = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            renamed.append(row)
            continue
        missing = [theirs for theirs in columns.values() if theirs not in row]
        if missing:
            ours = next(k for k, v in columns.items() if v == missing[0])
            raise UserError(f"{source} row {index} has no column {missing[0]!r} (mapped to {ours} by columns; "
                            f"columns: {', '.join(map(str, row)) or 'none'}): fix --columns")
        kept = {k: v for k, v in row.items() if k not in columns.values() and k not in columns}
        renamed.append(kept | {ours: row[theirs] for ours, theirs in columns.items()})
    return renamed


def detect_format(row, source: str = "dataset", dataset_format: str = "auto") -> str:
    """`dataset_format` itself, or (auto) the one format whose columns the first row has; Dolly when
    none matches (its validation then names the missing column)."""
    if dataset_format != "auto":
        if dataset_format not in FORMATS:
            raise UserError(f"dataset_format must be auto, {', '.join(FORMATS)}, got {dataset_format!r}")
        return dataset_format
    if not isinstance(row, dict):
        return "dolly"
    matches = [name for name, needed in DETECTED_BY.items() if all(column in row for column in needed)]
    if len(matches) > 1:
        raise UserError(f"{source} row 0 has the columns of several formats ({', '.join(matches)}): pass "
                        f"--dataset_format {matches[0]} (or another), or drop the extra columns")
    return matches[0] if matches else "dolly"


def validate_rows(rows: list, source: str = "dataset", dataset_format: str = "auto") -> str:
    """Raise a `UserError` naming the first missing column or bad row; return the format.

    Checked here: the columns and their types (and, for Dolly and Alpaca, non-empty instruction and
    response). What makes a conversation unusable (no assistant turn, an empty turn, roles out of
    order) is found when it is encoded, and the row is excluded and counted, not fatal."""
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{source} has no rows: pass a file with at least one row")
    fmt = detect_format(rows[0], source, dataset_format)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{source} row {index} is not an object with the columns {', '.join(FORMATS[fmt])}")
        if fmt in ("dolly", "alpaca"):
            _validate_flat(row, index, source, fmt)
        else:
            for column in FORMATS[fmt]:
                if column not in row:
                    raise UserError(f"{source} row {index} has no column {column!r} (columns: "
                                    f"{', '.join(map(str, row)) or 'none'}); rename or map it (--columns "
                                    f"{column}=YOUR_COLUMN)")
                _validate_messages(row[column], f"{source} row {index}: {column!r}",
                                   allow_text=fmt == "prompt_completion")
        if "category" in row and not isinstance(row["category"], str):
            raise UserError(f"{source} row {index}: 'category' is {type(row['category']).__name__}, expected a string")
    return fmt


def _validate_flat(row: dict, index: int, source: str, fmt: str) -> None:
    required = ("instruction", "context", "response") if fmt == "dolly" else ("instruction", "output")
    missing = [c for c in required if c not in row]
    if missing:
        raise UserError(f"{source} row {index} has no column {missing[0]!r} (columns: "
                        f"{', '.join(map(str, row)) or 'none'}); rename your columns to "
                        f"{', '.join(FORMATS[fmt])}, map them (--columns {missing[0]}=YOUR_COLUMN), or use "
                        "another format (Alpaca, messages, prompt/completion: see the README)")
    optional = ("category",) if fmt == "dolly" else ("input", "category")
    for column in required + tuple(c for c in optional if c in row):
        if not isinstance(row[column], str):
            raise UserError(f"{source} row {index}: {column!r} is {type(row[column]).__name__}, "
                            "expected a string (use \"\" for no context)")
    for column in (required[0], required[-1]):
        if not row[column].strip():
            raise UserError(f"{source} row {index}: {column!r} is empty; remove the row or fill it in")


def _validate_messages(value, where: str, allow_text: bool) -> None:
    if allow_text and isinstance(value, str):
        return
    if not isinstance(value, list):
        raise UserError(f"{where} is {type(value).__name__}, expected a list of {{role, content}} messages"
                        + (" or a string" if allow_text else ""))
    for number, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            keys = ", ".join(map(str, message)) if isinstance(message, dict) else type(message).__name__
            raise UserError(f"{where} message {number} is not {{role, content}} strings (got {keys}); convert it "
                            "(e.g. ShareGPT's from/value to role/content)")


# --- format ------------------------------------------------------------------------------------

def format_user_turn(instruction: str, context: str = "") -> str:
    """The user message: the instruction, then the context under a `Context:` line when there is one."""
    instruction, context = instruction.strip(), (context or "").strip()
    return f"{instruction}\n\nContext:\n{context}" if context else instruction


def to_example(row: dict) -> dict:
    """A Dolly row as a conversational prompt-completion example (TRL's dataset format)."""
    return {
        "prompt": [{"role": "user", "content": format_user_turn(row["instruction"], row.get("context", ""))}],
        "completion": [{"role": "assistant", "content": row["response"].strip()}],
    }


def to_conversation(row: dict, dataset_format: str = "dolly", system_prompt: str | None = None) -> dict:
    """A validated row of `dataset_format` as this project's example: `messages` (a conversation whose last
    message is the assistant turn to evaluate), `category`, and for prompt-completion rows `train_from`
    (the completion's first message: only the completion is trained). Contents are stripped, as Dolly's
    are; `system_prompt` becomes the first message when the row has no system turn."""
    train_from = None
    if dataset_format in ("dolly", "alpaca"):
        context, response = ("context", "response") if dataset_format == "dolly" else ("input", "output")
        messages = [{"role": "user", "content": format_user_turn(row["instruction"], row.get(context, ""))},
                    {"role": "assistant", "content": row[response].strip()}]
    elif dataset_format == "messages":
        messages = clean_messages(row["messages"])
    elif dataset_format == "prompt_completion":
        prompt, completion = _as_messages(row["prompt"], "user"), _as_messages(row["completion"], "assistant")
        messages, train_from = prompt + completion, len(prompt)
    else:
        raise UserError(f"dataset_format must be one of {', '.join(FORMATS)}, got {dataset_format!r}")
    with_system = with_system_prompt(messages, system_prompt)
    example = {"messages": with_system, "category": row.get("category", "")}
    if train_from is not None:
        example["train_from"] = train_from + len(with_system) - len(messages)
    return example


def to_conversations(rows: list[dict], dataset_format: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """Every row as `to_conversation` makes it, the format detected once (`detect_format`)."""
    fmt = detect_format(rows[0] if rows else None, dataset_format=dataset_format)
    return [to_conversation(row, fmt, system_prompt) for row in rows]


def clean_messages(messages: list[dict]) -> list[dict]:
    """`{role, content}` only, contents stripped: the same at training and inference."""
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value.strip()}] if isinstance(value, str) else clean_messages(value)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` with `system_prompt` first, unless it is empty or the conversation has its own."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def prompt_messages(instruction: str | list[dict], context: str = "", system_prompt: str | None = None) -> list[dict]:
    """What inference sends: an instruction (and context) as the user turn, or a conversation so far,
    with the system prompt first; formatted exactly as training formats it."""
    if isinstance(instruction, str):
        messages = to_example({"instruction": instruction, "context": context or "", "response": "-"})["prompt"]
    else:
        messages = clean_messages(instruction)
    return with_system_prompt(messages, system_prompt)


def check_turns(messages: list[dict], train_from: int = 0) -> None:
    """Raise a `UserError` (`kind: detail`) for a conversation that cannot be trained and evaluated:
    an unknown role, an empty turn, no assistant turn (after `train_from`), roles out of order (an
    optional system turn first, then user and assistant alternating, ending with the assistant)."""
    roles = [m["role"] for m in messages]
    for number, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise UserError(f"unknown role: {message['role']!r} at message {number} (use system, user, assistant)")
        if not message["content"].strip():
            raise UserError(f"empty {message['role']} turn: message {number}")
    if "assistant" not in roles[train_from:]:
        where = " in the completion" if train_from else ""
        raise UserError(f"no assistant turn{where}: roles {', '.join(roles) or 'none'}")
    expected = "user"
    for number, role in enumerate(roles):
        if role == "system" and number == 0:
            continue
        if role != expected:
            raise UserError(f"roles out of order: {role} at message {number}, expected {expected}")
        expected = "assistant" if role == "user" else "user"
    if roles[-1] != "assistant":
        raise UserError(f"roles out of order: the conversation ends with a {roles[-1]} turn, not an assistant turn")


def check_system_prompt(system_prompt: str | None, tokenizer) -> None:
    """Raise a `UserError` for a system prompt holding a special-token string (every row would fail)."""
    marker = find_special_text(system_prompt or "", tokenizer)
    if marker:
        raise UserError(f"system_prompt contains the special string {marker!r}, which would be read as a control "
                        "token: remove it")


def exclusion_counts(excluded: dict[int, str]) -> dict[str, int]:
    """How many rows were excluded for each kind of reason, most frequent first."""
    def kind(reason: str) -> str:
        if "max_length" in reason:
            return "over max_length"
        if "special string" in reason:
            return "special-token text"
        return reason.split(":")[0]

    return dict(Counter(kind(reason) for reason in excluded.values()).most_common())


def find_special_text(text: str, tokenizer) -> str | None:
    """The first special-token or role-marker string inside `text`, if any."""
    for marker in (*tokenizer.all_special_tokens, *ROLE_MARKERS):
        if marker and marker in text:
            return marker
    return None


# --- tokenize ----------------------------------------------------------------------------------

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
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=True)["input_ids"]
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
    template and this module's code, so a second run on the same data skips tokenizing (any
    `max_length`); see `encoding_cache_path`."""
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
    for part in (inspect.getsource(sys.modules[__name__]), transformers.__version__, backend.to_str(),
                 str(tokenizer.chat_template), json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
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


def length_stats(lengths: list[int], max_length: int | None = None) -> dict:
    """Mean, median, p90, p99 and max of token lengths, and how many exceed `max_length`."""
    values = np.asarray(lengths)
    stats = {"rows": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
             "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
             "max": int(values.max())}
    if max_length is not None:
        stats["over_max_length"] = int((values > max_length).sum())
    return stats


# --- split -------------------------------------------------------------------------------------

def split_rows(rows: list[dict], indices: list[int], train_size: int, eval_size: int, test_size: int,
               seed: int) -> dict[str, list[int]]:
    """Disjoint train/validation/test row indices, stratified by category when rows have one.

    Validation and test are held out first; train is drawn from the rest. Deterministic in `seed`."""
    if eval_size + test_size >= len(indices):
        raise UserError(f"eval_size + test_size = {eval_size + test_size} leaves no training rows out of "
                        f"{len(indices)} usable rows: lower them")
    rng = random.Random(seed)
    rest = sorted(indices)
    held = stratified_sample(rows, rest, eval_size + test_size, rng)
    rest = sorted(set(rest) - set(held))
    if train_size > len(rest):
        raise UserError(f"train_size {train_size} is larger than the {len(rest)} rows left after the "
                        f"held-out splits: lower train_size to at most {len(rest)}")
    validation = stratified_sample(rows, held, eval_size, rng)
    test = sorted(set(held) - set(validation))
    train = stratified_sample(rows, rest, train_size, rng)
    return {"train": train, "validation": validation, "test": test}


def stratified_sample(rows: list[dict], pool: list[int], n: int, rng: random.Random) -> list[int]:
    """`n` indices from `pool`, each category getting its share (largest remainder), sorted."""
    groups = defaultdict(list)
    for index in sorted(pool):
        groups[rows[index].get("category", "")].append(index)
    quotas = {cat: n * len(members) / len(pool) for cat, members in groups.items()}
    counts = {cat: int(q) for cat, q in quotas.items()}
    for cat in sorted(quotas, key=lambda c: (counts[c] - quotas[c], c))[: n - sum(counts.values())]:
        counts[cat] += 1
    chosen = []
    for cat in sorted(groups):
        chosen += rng.sample(groups[cat], counts[cat])
    return sorted(chosen)


def category_counts(rows: list[dict], indices: list[int]) -> dict[str, int]:
    return dict(Counter(rows[i].get("category", "") for i in indices).most_common())
