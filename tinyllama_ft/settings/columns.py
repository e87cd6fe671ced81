"""`columns`: which of the dataset's columns hold the fields this project reads, parsed and checked at the
door with the other settings (`data/formats.py` renames the rows with it)."""

from __future__ import annotations

import json

from ..errors import UserError

COLUMN_NAMES = ("instruction", "context", "response", "input", "output", "category", "messages", "prompt",
                "completion")


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
