"""Where a configuration's values come from, read as the user wrote them: the flags given (TRL's parser,
with no defaults filled in and no type conversion, which `validation.validate` does for every source
alike), a `--config` YAML file (read safely: its syntax, shape, duplicate keys and alias expansion checked
in one line) and a preset; `merge_layers` puts them together for any configuration class (`train`'s
`Config`, `dpo`'s `DpoConfig`), refusing unknown names with a "did you mean"."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import os
import types
from pathlib import Path

import yaml
from trl import TrlParser

from ..errors import UserError
from .validation import field_kind, show


class _Parser(TrlParser):
    command = "config"  # whose --help lists the fields

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
        raise UserError(f"{message}{hint}; see `python -m tinyllama_ft {self.command} --help`")


def where_unknown(key, source: str) -> str:
    shown = show(key) if isinstance(key, str) else repr(show(key))
    return {"flag": f"--{shown}", "variable": f"TINYLLAMA_FT_{shown.upper()}", "keyword": f"{shown!r}"}.get(
        source, f"{shown!r} in {source[5:]}" if source.startswith("file ") else repr(shown))


def close_match(key, names) -> str:
    """" (did you mean NAME?)" for the field `key` most likely meant, case aside; "" when none is close."""
    if not isinstance(key, str):
        return ""
    key = key.lower()
    names = sorted(names, key=lambda n: not (key.startswith(n) or n.startswith(key)))  # lora_rank -> lora_r
    match = [n for n in names if key.startswith(n) or n.startswith(key)][:1] or difflib.get_close_matches(key, names, 1)
    return f" (did you mean {match[0]}?)" if match else ""


def parse_flags(cls, args: list[str], command: str = "config") -> dict:
    """The flags given, each converted by the field's type (TRL's parser, nothing filled in for the others)."""
    parser = _flag_parser(cls)
    parser.command = command
    parser.prog = f"python -m tinyllama_ft {command}"  # not sys.argv[0] (`__main__.py`, or a test runner's)
    return vars(parser.parse_args(args))


@functools.lru_cache(maxsize=4)
def _flag_parser(cls) -> "_Parser":
    parser = _Parser(cls)
    kinds = {f.name: field_kind(cls, f.name) for f in dataclasses.fields(cls)}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        if kinds.get(action.dest) in ("int", "float", "bool", "str", "list", "floats"):
            action.type = action.choices = None  # checked by `validate`: a flag's error reads like a file's
    return parser


def split_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    """(the file of `--config F` or `--config=F`, the other arguments); (None, args) without one."""
    for index, arg in enumerate(args):
        if arg == "--config":
            if index + 1 == len(args):
                raise UserError("--config needs a file: pass --config run.yaml")
            return args[index + 1], args[:index] + args[index + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], args[:index] + args[index + 1:]
    return None, list(args)


def config_path(args: list[str]) -> str | None:
    return split_config_flag(args)[0]


def yaml_problem(error) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(error, "problem", None) or error).splitlines()[0][:200]


MAX_YAML_NODES = 10_000  # values in a configuration file once its aliases are expanded (a real one has ~100)


class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with a key given twice in one mapping refused (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if seen.setdefault((key_node.tag, key_node.value), line) != line:
                    raise _DuplicateKey(f"key {show(key_node.value)!r} is given twice (lines "
                                        f"{seen[(key_node.tag, key_node.value)]} and {line}): keep one")
        return super().construct_mapping(node, deep)


def _expanded_size(node, sizes: dict) -> int:
    """How many values `node` holds once every alias is expanded (each shared node counted once per use)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:  # an alias inside its own anchor
            raise _DuplicateKey("an alias refers to the value that holds it: remove the loop")
        return sizes[id(node)]
    sizes[id(node)] = None
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_NODES:
            break
    sizes[id(node)] = total
    return total


def load_yaml(text: str):
    """`text`'s one document, as `yaml.safe_load` reads it, refusing duplicate keys and aliases that expand past
    `MAX_YAML_NODES` values (an "alias bomb": a few lines that stand for billions of values)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise _DuplicateKey(f"its aliases expand to more than {MAX_YAML_NODES:,} values: write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | None) -> dict:
    """The `--config` file's mapping; {} when there is none."""
    if not path:
        return {}
    if not Path(path).is_file():
        problem = "is a folder" if Path(path).is_dir() else "No such file or directory"
        raise UserError(f"--config {path}: {problem}: pass a YAML file")
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path} is not valid YAML ({yaml_problem(error)}): fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path} is not UTF-8 text: pass a YAML file") from None
    except _DuplicateKey as error:
        raise UserError(f"--config {path}: {error}") from None
    except RecursionError:
        raise UserError(f"--config {path} nests its values too deep to read: flatten the file") from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        problem = str(error).split(":")[0][:120]
        raise UserError(f"--config {path} holds a value Python cannot read ({problem}): fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path} holds a YAML {type(data).__name__}, not a mapping of field names to "
                        "values: write one `name: value` a line")
    return data


def file_layer(args: list[str]) -> tuple[str | None, dict, list[str]]:
    """(the `--config` file, its values, the other arguments), after setting the variables of its `env:`
    section (TRL's: set before the run)."""
    path, rest = split_config_flag(list(args))
    values = read_yaml(path)
    env = values.pop("env", None) or {}
    if not isinstance(env, dict) or not all(isinstance(v, (str, int, float, bool)) for v in env.values()):
        what = type(env).__name__ if not isinstance(env, dict) else "a mapping with values that are not text"
        raise UserError(f"--config {path}: `env:` must be a mapping of variable names to values, not {what}: write "
                        "one `NAME: value` a line under it")
    os.environ.update({str(key): str(value) for key, value in env.items()})
    return path, values, rest


def merge_layers(cls, presets: dict[str, dict], layers: list[tuple[str, dict]], command: str = "config"
                 ) -> tuple[dict, dict]:
    """(values, where each came from) of (source, values) `layers`, lowest first, over the preset named by
    the highest layer that names one. An unknown name or preset is one line naming its source."""
    from .validation import refuse, sources

    source, preset = next(((s, values["preset"]) for s, values in reversed(layers)
                           if values.get("preset") not in (None, "")), (None, None))
    if preset is not None and (not isinstance(preset, str) or preset not in presets):  # a list is no dict key
        with sources({"preset": source}):
            raise refuse("preset", preset, f"is not a preset (presets: {', '.join(presets)})", next(iter(presets)))
    merged, origin = dict(presets.get(preset, {})), {k: f"preset {preset}" for k in presets.get(preset, {})}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for source, values in layers:
        for key in values:
            if key not in names:
                raise UserError(f"unknown configuration field {where_unknown(key, source)}{close_match(key, names)}: "
                                f"see `python -m tinyllama_ft {command} --help`")
        merged |= values
        origin |= {key: source for key in values}
    merged["preset"] = preset  # the one applied (an empty value below a named preset does not hide it)
    return merged, origin
