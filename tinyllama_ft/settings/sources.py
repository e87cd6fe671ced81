"""Where a configuration's values come from, read as the user wrote them: the flags given (TRL's parser,
with no defaults filled in and no type conversion, which `validation.validate` does for every source
alike) and a `--config` YAML file (its syntax and shape checked in one line)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import types
from pathlib import Path

import yaml
from trl import TrlParser

from ..errors import UserError
from .validation import field_kind


class _Parser(TrlParser):
    @staticmethod
    def _parse_dataclass_field(parser, field):  # argparse takes `choices` from the metadata, not our `check`
        field = copy.copy(field)
        field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k != "check"})
        TrlParser._parse_dataclass_field(parser, field)

    def error(self, message):  # argparse prints usage and exits; one clear line instead
        flags = [word[2:].split("=")[0] for word in message.split() if word.startswith("--")]
        hint = close_match(flags[0], [a.dest for a in self._actions]) if message.startswith("unrecognized") and flags \
            else ""
        if "expected one argument" in message:
            hint = " (a value that starts with '-' is written --name=VALUE)"
        raise UserError(f"{message}{hint}; see `python -m tinyllama_ft config --help`")


def where_unknown(key: str, source: str) -> str:
    return {"flag": f"--{key}", "variable": f"TINYLLAMA_FT_{key.upper()}", "keyword": f"{key!r}"}.get(
        source, f"{key!r} in {source[5:]}" if source.startswith("file ") else repr(key))


def close_match(key: str, names) -> str:
    names = sorted(names, key=lambda n: not (key.startswith(n) or n.startswith(key)))  # lora_rank -> lora_r
    match = [n for n in names if key.startswith(n) or n.startswith(key)][:1] or difflib.get_close_matches(key, names, 1)
    return f" (did you mean {match[0]}?)" if match else ""


def parse_flags(cls, args: list[str]) -> dict:
    """The flags given, each converted by the field's type (TRL's parser, nothing filled in for the others)."""
    namespace = _flag_parser(cls).parse_args(args)
    return vars(namespace)


@functools.lru_cache(maxsize=1)
def _flag_parser(cls) -> "_Parser":
    parser = _Parser(cls)
    kinds = {f.name: field_kind(cls, f.name) for f in dataclasses.fields(cls)}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        if kinds.get(action.dest) in ("int", "float", "bool", "str", "list"):
            action.type = action.choices = None  # checked by `validate`: a flag's error reads like a file's
    return parser


def config_path(args: list[str]) -> str | None:
    return args[args.index("--config") + 1] if "--config" in args[:-1] else None


def yaml_problem(error) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(error, "problem", None) or error).splitlines()[0]


def read_yaml(path: str | None) -> dict:
    """The `--config` file's mapping; {} when there is none (a missing file is reported by the parser)."""
    if not path or not Path(path).is_file():
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path} is not valid YAML ({yaml_problem(error)}): fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path} is not UTF-8 text: pass a YAML file") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path} holds a YAML {type(data).__name__}, not a mapping of field names to "
                        "values: write one `name: value` a line")
    return data
