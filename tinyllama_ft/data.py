"""Dolly rows -> chat examples -> token ids and labels, split and measured.

Layout of the user turn (used at training and inference alike)::

    {instruction}

    Context:
    {context}

(the last two lines only when the context is not empty). The assistant turn is the response.
Token ids come from the tokenizer's own chat template with one BOS first, exactly as `generate`
feeds the model; labels are -100 on the prompt and cover the response plus the EOS that ends it.
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
ROLE_MARKERS = ("<|user|>", "<|assistant|>", "<|system|>")
IGNORE_INDEX = -100


# --- load and validate ---------------------------------------------------------------------------

def load_rows(dataset_name: str) -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet file or of a hub dataset's train split, validated."""
    path = Path(dataset_name)
    if path.suffix in (".json", ".jsonl", ".parquet") or path.exists():
        rows = _read_file(path)
    else:
        rows = _read_hub(dataset_name)
    validate_rows(rows, source=dataset_name)
    return rows


def _read_file(path: Path) -> list[dict]:
    """Rows of a local file. JSON may be one array or one object a line (either extension), in
    UTF-8 with or without a BOM and with any line endings (what Windows editors write)."""
    if path.is_dir():
        raise UserError(f"dataset {path} is a folder: pass a .json, .jsonl or .parquet file inside it")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist: check --dataset_name")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix not in (".json", ".jsonl"):
        raise UserError(f"dataset file {path} is not .json, .jsonl or .parquet: convert it or rename it")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8 JSON") from None
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


def _read_hub(name: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split="train").to_list()
    except Exception as error:  # network, unknown id, no access: one line, with the cause
        raise UserError(f"could not load dataset {name!r} from the hub ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); pass a local .jsonl file "
                        "or check the id and your network") from None


def validate_rows(rows: list, source: str = "dataset") -> None:
    """Raise a `UserError` naming the first missing column or bad row."""
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{source} has no rows: pass a file with at least one Dolly row")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{source} row {index} is not an object with instruction/context/response")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise UserError(f"{source} row {index} has no column {missing[0]!r} (columns: "
                            f"{', '.join(map(str, row)) or 'none'}); rename your columns to "
                            "instruction, context, response")
        for column in REQUIRED_COLUMNS + (("category",) if "category" in row else ()):
            if not isinstance(row[column], str):
                raise UserError(f"{source} row {index}: {column!r} is {type(row[column]).__name__}, "
                                "expected a string (use \"\" for no context)")
        for column in ("instruction", "response"):
            if not row[column].strip():
                raise UserError(f"{source} row {index}: {column!r} is empty; remove the row or fill it in")


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
    """`input_ids` and `labels` of one prompt-completion example: the prompt ids are those of
    `encode_prompt`; the labels are -100 on them and cover the response and its closing EOS."""
    prompt_ids = encode_prompt(tokenizer, example["prompt"])
    marker = find_special_text(example["completion"][0]["content"], tokenizer)
    if marker:
        raise UserError(f"response contains the special string {marker!r}")
    full_ids = _chat_ids(tokenizer, example["prompt"] + example["completion"], add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise UserError("the chat template renders the prompt differently with and without the answer; "
                        "use a template whose generation prompt is a prefix of the conversation")
    completion = full_ids[len(prompt_ids):]
    # Keep the response up to and including the EOS that closes it; drop what the template adds after.
    end = completion.index(tokenizer.eos_token_id) + 1
    completion = completion[:end]
    return {"input_ids": prompt_ids + completion, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion}


def encode_rows(tokenizer, rows: list[dict], max_length: int, cache_dir: str | Path | None = None
                ) -> tuple[dict[int, dict], dict[int, str], dict[int, int]]:
    """Encode every row; return ({row index: encoded}, {row index: why it was excluded},
    {row index: token length}, the last also for rows dropped for length).

    Rows longer than `max_length` are dropped, not truncated: a truncated response loses the EOS
    the model must learn. Rows with special-token strings are dropped too.

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
            items[index] = encode_example(tokenizer, to_example(row))
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
