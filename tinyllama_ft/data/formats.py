"""Rows of any supported format -> one conversation shape: read, validate, format.

Formats, detected from the columns (or forced with `dataset_format`):

* Dolly: ``instruction``, ``context`` (optional), ``response`` (``category`` optional);
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
message of every conversation that has none. Token ids are `encoding.py`'s job.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..errors import UserError
from ..settings.columns import COLUMN_NAMES, parse_columns  # noqa: F401 (parse_columns: part of this module's API)
from ..settings.hub import check_on_hub

FORMATS = {"dolly": ("instruction", "context", "response"), "alpaca": ("instruction", "input", "output"),
           "messages": ("messages",), "prompt_completion": ("prompt", "completion")}

DETECTED_BY = {"dolly": ("instruction", "response"), "alpaca": ("instruction", "output"),
               "messages": ("messages",), "prompt_completion": ("prompt", "completion")}

ROLES = ("system", "user", "assistant")

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")  # what datasets reads from a folder


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
        rows = read_dataset(dataset_name, dataset_config, dataset_split)
    elif path.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv") or path.exists():
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


def read_dataset(name: str, config_name: str | None = None, split: str = "train") -> list[dict]:
    """Rows of a hub dataset or a local dataset folder: one that `Dataset.save_to_disk` or
    `DatasetDict.save_to_disk` wrote (`datasets.load_from_disk`), or one of data files (`load_dataset`)."""
    path = Path(name)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _read_saved(path, split)
    return _read_hub(name, config_name, split)


def _read_saved(path: Path, split: str = "train") -> list[dict]:
    """A folder `save_to_disk` wrote: a `Dataset` (its one split), or a `DatasetDict` (split `split`); a slice
    such as `train[:2000]` or `train[100:200]` takes those rows."""
    import datasets

    name, _, spec = (split or "train").partition("[")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged or partial folder: one line, with the cause
        raise UserError(f"dataset folder {path} could not be read ({type(error).__name__}: "
                        f"{(str(error).splitlines() or [''])[0][:200]}): save it again with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            raise UserError(f"dataset folder {path} has no split {name!r} (splits: {', '.join(loaded)}): pass "
                            f"--dataset_split {next(iter(loaded))}")
        loaded = loaded[name]
    rows = loaded.to_list()
    if spec:
        bounds = spec.rstrip("]").split(":")
        if len(bounds) != 2 or not all(b.strip().lstrip("-").isdigit() or not b.strip() for b in bounds):
            raise UserError(f"--dataset_split {split}: a folder saved with save_to_disk takes NAME or NAME[a:b] "
                            "(whole numbers): pass e.g. train[:2000]")
        start, stop = (int(b) if b.strip() else None for b in bounds)
        rows = rows[start:stop]
    return rows


def check_local_file(dataset_name: str) -> None:
    """Refuse a dataset file that does not exist (by its suffix, a file, not a hub id): the first thing to say."""
    path = Path(dataset_name)
    if path.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv") and not path.exists():
        raise UserError(f"dataset file {path} does not exist: check --dataset_name")


def _read_hub(name: str, config_name: str | None = None, split: str = "train") -> list[dict]:
    import datasets

    if not Path(name).is_dir():
        check_on_hub(name, "dataset", "--dataset_name")  # one line at once when the hub cannot give it
    try:
        return datasets.load_dataset(name, config_name or None, split=split or "train").to_list()
    except Exception as error:  # network, unknown id, config or split, no access: one line, with the cause
        raise UserError(f"could not load dataset {name!r} (configuration {config_name or 'default'}, split "
                        f"{split or 'train'}) ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); pass a local .jsonl file "
                        "or check the id, --dataset_config, --dataset_split and your network") from None


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
    required = ("instruction", "response") if fmt == "dolly" else ("instruction", "output")
    optional = ("context", "category") if fmt == "dolly" else ("input", "category")
    missing = [c for c in required if c not in row]
    for column in optional[:1]:  # an optional column misspelt would be dropped without a word
        near = difflib.get_close_matches(column, [c for c in row if isinstance(c, str) and c not in FORMATS[fmt]], 1,
                                         0.8)
        if column not in row and near:
            raise UserError(f"{source} row {index} has no column {column!r} but has {near[0]!r}: rename it, or map "
                            f"it (--columns {column}={near[0]})")
    if missing:
        raise UserError(f"{source} row {index} has no column {missing[0]!r} (columns: "
                        f"{', '.join(map(str, row)) or 'none'}); rename your columns to "
                        f"{', '.join(FORMATS[fmt])}, map them (--columns {missing[0]}=YOUR_COLUMN), or use "
                        "another format (Alpaca, messages, prompt/completion: see docs/DATA.md)")
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
