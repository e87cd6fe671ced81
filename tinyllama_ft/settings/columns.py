"""`columns`: which of the dataset's columns hold the fields this project reads, parsed and checked at the
door with the other settings (`data/formats.py` renames the rows with it)."""

from __future__ import annotations

import json

from ..errors import UserError

COLUMN_NAMES = ("instruction", "context", "response", "input", "output", "category", "messages", "prompt",
                "completion")


def parse_columns(value, names: tuple[str, ...] = COLUMN_NAMES,
                  example: str = "instruction=question,response=answer") -> dict[str, str]:
    """`columns` as {this project's column name: the dataset's column name}, from a dict (YAML), JSON
    (`{"instruction": "question"}`) or `instruction=question,response=answer`. `names` are the names it may map
    (DPO's pairs have their own), `example` what the errors suggest."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise UserError(f"columns: invalid JSON ({error.msg}): write {example}") from None
    if isinstance(value, str):
        pairs = [item.strip() for item in value.split(",") if item.strip()]
        bad = [item for item in pairs if item.count("=") != 1 or not all(p.strip() for p in item.split("="))]
        if bad:
            raise UserError(f"columns: {bad[0]!r} is not NAME=COLUMN: write {example}")
        value = dict((k.strip(), v.strip()) for k, v in (item.split("=") for item in pairs))
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UserError(f"columns must map names to column names, got {value!r}: write {example.split(',')[0]}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise UserError(f"columns: unknown name {unknown[0]!r}: map one of {', '.join(names)} "
                        "(NAME=YOUR_COLUMN)")
    return dict(value)
