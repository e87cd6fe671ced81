"""The one check of every configuration value, whatever it came from (a flag, a YAML file, a
`TINYLLAMA_FT_*` variable, the notebook's parameters cell, a Python keyword).

Each field's rule is declared beside it, in its metadata (`check`: "> 0", ">= 0", "[0, 1)", ">= 16"...;
`choices`: the names allowed); fields inherited from TRL and transformers get theirs in
`INHERITED_CHECKS`. `validate(config)` runs them all in `Config.__post_init__`:

1. the value is converted to the field's declared type exactly as a flag would be (`"8"` -> 8, `8.0` -> 8,
   `"q_proj"` -> ["q_proj"] for a list, `"true"` -> True); what cannot be converted (`8.5` for an int, a
   list for a number, a number for a list of names) is refused;
2. every number is finite (`nan <= 0` is False, so a range check alone lets NaN through);
3. the declared range or choices.

Every refusal is one line: where the value came from, as the user wrote it (`--lora_r 8.5`,
`lora_r: 8.5 in run.yaml`, `TINYLLAMA_FT_LORA_R=8.5`, `lora_r=8.5`), what is wrong and what to pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from functools import lru_cache

from ..errors import UserError

# Rules for fields declared by TRL / transformers (their own `__post_init__` checks little of this).
INHERITED_CHECKS = {
    "max_grad_norm": ">= 0", "weight_decay": ">= 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
    "adam_epsilon": "> 0", "label_smoothing_factor": "[0, 1)", "dataloader_num_workers": ">= 0",
    "dataloader_prefetch_factor": "> 0", "eval_accumulation_steps": "> 0", "completion_only_loss": None,
    "neftune_noise_alpha": ">= 0", "data_seed": "[0, 4294967295]", "dataset_num_proc": "> 0",
    "max_seq_length": ">= 16", "pad_to_multiple_of": "> 0", "eval_delay": ">= 0", "warmup_ratio": "[0, 1]",
    "logging_first_step": None, "torch_empty_cache_steps": "> 0", "ddp_timeout": "[1, 86400000]",
    "average_tokens_across_devices": None,
    # TRL's DPOConfig
    "ld_alpha": "[0, 1]", "discopop_tau": "> 0", "ref_model_mixup_alpha": "[0, 1]", "ref_model_sync_steps": "> 0",
    "precompute_ref_batch_size": "> 0", "f_alpha_divergence_coef": "> 0",
}
HINTS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
         "list": "one name or several (a,b or a list)", "floats": "numbers (a,b or a list)"}


class _BoundedRepr(reprlib.Repr):
    """`repr` cut short at every level (3 deep, 6 items, 40 characters a string): "..." marks what it left out."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 6, 6
        self.maxstring = self.maxother = self.maxlong = 40

    def repr_int(self, x, level):
        return "..." if x.bit_length() > 200 else repr(x)  # repr of a 5,000-digit int raises


_BOUNDED = _BoundedRepr()

_sources: contextvars.ContextVar[dict] = contextvars.ContextVar("sources", default={})


@contextlib.contextmanager
def sources(mapping: dict[str, str]):
    """While building a Config, say where each given value came from: field -> "flag", "file PATH",
    "variable", "notebook" (the parameters cell) or "keyword" (the default when nothing is said)."""
    token = _sources.set(mapping)
    try:
        yield
    finally:
        _sources.reset(token)


def where(name: str, value) -> str:
    """The value as the user wrote it, for the first words of a message."""
    source = _sources.get().get(name, "keyword")
    flag_words = source in ("flag", "variable") and isinstance(value, list) and all(isinstance(v, str) for v in value)
    shown = " ".join(value) if flag_words else _show(value)
    if source == "flag":
        return f"--{name} {shown}"
    if source.startswith("file "):
        return f"{name}: {shown} in {source[5:]}"
    if source == "variable":
        return f"TINYLLAMA_FT_{name.upper()}={shown}"
    if source == "notebook":
        return f"{name} = {shown} in the notebook's parameters cell"
    if source.startswith("preset "):
        return f"{name}={shown} (preset {source[7:]})"
    return f"{name}={shown}"


def how_to_set(name: str, example) -> str:
    """How to pass `example` for `name` the way the user passed the wrong value."""
    source = _sources.get().get(name, "keyword")
    if source == "flag":
        return f"--{name} {example}"
    if source.startswith("file "):
        return f"`{name}: {example}` in {source[5:]}"
    if source == "variable":
        return f"TINYLLAMA_FT_{name.upper()}={example}"
    return f"{name}={example}"


def _show(value) -> str:
    """`value` for a message, never longer than about 60 characters: text cut short, a container too big to
    show whole as its type and length (`a list of 1000 items`), an integer too long to print as its digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an int of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (list, tuple, dict, set)):
        text = _BOUNDED.repr(value)
        if "..." in text or len(text) > 60:
            return f"a {type(value).__name__} of {len(value)} item{'s' * (len(value) != 1)}"
    else:
        text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return (text[:60] + "...") if len(text) > 60 else (text if text.strip() else repr(value))


show = _show  # the public name: every message that quotes a user's value goes through it


def refuse(name: str, value, problem: str, example=None) -> UserError:
    fix = f": pass {how_to_set(name, example)}" if example is not None else ""
    return UserError(f"{where(name, value)}: {problem}{fix}")


# --- declared rules ------------------------------------------------------------------------------

_RANGE = re.compile(r"^([\[(])\s*(-?[\d.e+]+)\s*,\s*(-?[\d.e+]+)\s*([\])])$")


def parse_rule(rule: str):
    """A rule string -> (test(value) -> bool, words). "> 0", ">= 16", "[0, 1)" (a range), "nonempty"."""
    rule = rule.strip()
    if rule == "nonempty":
        return (lambda v: len(v) > 0), "must name at least one"
    match = _RANGE.match(rule)
    if match:
        left, low, high, right = match.groups()
        low, high = float(low), float(high)
        return (lambda v: (low <= v if left == "[" else low < v) and (v <= high if right == "]" else v < high)), \
            f"must be in {rule}"
    op, bound = rule.split()
    bound = float(bound)
    tests = {">": lambda v: v > bound, ">=": lambda v: v >= bound, "<": lambda v: v < bound,
             "<=": lambda v: v <= bound}
    return tests[op], f"must be {op} {bound:g}"


def _inside(rule: str, kind: str):
    """A value that `rule` allows, for an example: its lower bound when allowed, else a point inside."""
    match = _RANGE.match(rule.strip())
    if not match:
        op, bound = rule.split()
        number = float(bound) + (1 if op == ">" else -1 if op == "<" else 0)
    else:
        left, low, high, _ = match.groups()
        number = float(low) if left == "[" else (float(low) + float(high)) / 2
    return int(number) if kind == "int" else number


def field_rule(field: dataclasses.Field) -> str | None:
    return field.metadata.get("check", INHERITED_CHECKS.get(field.name))


# --- types ---------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def field_kind(cls, name: str) -> str | None:
    return _kind(field_types(cls).get(name))[0]


def _kind(annotation):
    """(base kind, optional): int, float, bool, str, list (of str), or None for types left to transformers."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = False
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None, optional
        annotation, origin = rest[0], typing.get_origin(rest[0])
    if origin is list and typing.get_args(annotation) == (str,):
        return "list", optional
    if origin is list and typing.get_args(annotation) == (float,):
        return "floats", optional
    for kind in (bool, int, float, str):
        if annotation is kind:
            return kind.__name__, optional
    return None, optional


TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}
NONE = {"none", "null", ""}


def convert(name: str, value, kind: str):
    """`value` as `kind`, as a flag's text would be converted; raises `refuse(...)` when it cannot be."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        raise refuse(name, value, "must be true or false", "true")
    if kind == "int":
        number = _number(name, value, kind)
        if not float(number).is_integer():
            raise refuse(name, value, "must be a whole number", _example(name, round(number) or 1))
        return int(number)
    if kind == "float":
        return float(_number(name, value, kind))
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)
        raise refuse(name, value, f"must be text, not a {type(value).__name__}", '"..."')
    if kind == "list":  # "a,b", "a b", ["a", "b"] and ["a,b"] are the same two names
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return [part for v in value for part in re.split(r"[,\s]+", v) if part]
        raise refuse(name, value, "must be names (text), one or several", "q_proj,v_proj")
    if kind == "floats":  # "0.8,0.2", "0.8 0.2", [0.8, 0.2]: each a finite number
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise refuse(name, value, "must be numbers, one or several", "1.0")
        parts = [p for v in value for p in (re.split(r"[,\s]+", v) if isinstance(v, str) else [v]) if p != ""]
        return [float(_number(name, part, "float")) for part in parts]
    return value


def _number(name: str, value, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise refuse(name, value, f"must be {HINTS[kind]}, not a {type(value).__name__}", _example(name, 1))
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise refuse(name, value, f"must be {HINTS[kind]}", _example(name, 1)) from None
    if isinstance(value, str) and kind == "int" and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        number = int(value)  # exact, however large
    if isinstance(number, float) and not math.isfinite(number):
        raise refuse(name, value, f"must be a finite number, not {value}", _example(name, 1))
    return number


_defaults: contextvars.ContextVar[dict] = contextvars.ContextVar("defaults", default={})


def _example(name: str, fallback):
    """The field's default when it is a good example of a value (a number other than 0), else `fallback`."""
    default = _defaults.get().get(name)
    return default if isinstance(default, (int, float)) and not isinstance(default, bool) and default else fallback


# --- the loop --------------------------------------------------------------------------------------

def validate(config) -> None:
    """Convert and check every field of `config` in place (see the module's docstring)."""
    hints = field_types(type(config))
    _defaults.set({f.name: f.default for f in dataclasses.fields(config)})
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        value = getattr(config, field.name)
        kind, optional = _kind(hints.get(field.name))
        if value is None:
            if kind is not None and not optional and field.default is not None:
                raise refuse(field.name, value, "must be set", _example(field.name, field.default))
            continue
        if kind is None:
            if isinstance(value, float) and not math.isfinite(value):
                raise refuse(field.name, value, "must be a finite number", 1)
            continue
        if optional and isinstance(value, str) and value.strip().lower() in NONE:
            setattr(config, field.name, None)
            continue
        raw, value = value, convert(field.name, value, kind)
        setattr(config, field.name, value)
        rule, choices = field_rule(field), list(field.metadata.get("choices") or [])
        if choices:
            bad = [v for v in value if v not in choices] if kind == "list" else [] if value in choices else [value]
            if bad:
                which = f"{_show(bad[0])} is not one of" if kind == "list" else "must be one of"
                raise refuse(field.name, raw, f"{which} {', '.join(map(str, choices))}", choices[0])
        if rule and kind in ("int", "float", "list", "floats"):
            test, words = parse_rule(rule)
            if not test(value):
                example = _example(field.name, 1)
                example = example if kind == "list" or test(example) else _inside(rule, kind)
                raise refuse(field.name, raw, f"{field.name} {words}", example if kind != "list" else "q_proj")


# --- between fields ----------------------------------------------------------------------------------

def check_optimizer_steps(config, rows: str = "rows") -> None:
    """Refuse a run whose epoch has fewer micro-batches than one optimizer step accumulates: it would never take
    the step it was asked for (one partial step, in warm-up at a learning rate of 0, learns nothing)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro_batches = math.ceil(config.train_size / (config.per_device_train_batch_size * world))
    if config.gradient_accumulation_steps > micro_batches:
        processes = f" x {world} processes" if world > 1 else ""
        raise refuse("gradient_accumulation_steps", config.gradient_accumulation_steps,
                     f"is more than the {micro_batches} micro-batch{'es' * (micro_batches != 1)} an epoch has "
                     f"(train_size {config.train_size} {rows} / per_device_train_batch_size "
                     f"{config.per_device_train_batch_size}{processes}), so no optimizer step is ever complete: lower "
                     "it or raise train_size", micro_batches)


def inherited_post_init(post_init, command: str = "config") -> None:
    """transformers'/TRL's own `__post_init__`, whose refusals (ValueError and kin, raised deep inside) become one
    line naming the setting it names."""
    import warnings

    try:
        with warnings.catch_warnings():  # transformers' renames of its own fields are not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            post_init()
    except UserError:
        raise
    except (ValueError, TypeError, OverflowError, ImportError, NotImplementedError, RuntimeError, KeyError,
            AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"transformers/TRL refuse this configuration ({first}): change the setting it "
                        f"names (see `python -m tinyllama_ft {command} --help`)") from None
