"""Fuzzing the configuration door: hypothesis draws a field (every one of `Config`'s, TRL's and
transformers' included) and a hostile value for it (NaN, +-inf, 0, negatives, huge, wrong types, empty
and unicode strings, lists for scalars and the reverse), given as a flag, in a YAML file, as a
`TINYLLAMA_FT_*` variable or as a Python keyword; and the same for `dpo`'s fields (a flag, a YAML line) and the
generation settings of `generate` and `chat`. Each must end in a `UserError` of one line, or in a
configuration whose numbers are finite and that holds what was asked (no value silently dropped).

In-process through `parse_config` for speed (~40 ms an example); a handful through the real command
line. The seed is printed in pytest's header (`FUZZ_SEED=N` replays a run); the example budget is
`FUZZ_EXAMPLES` (default 400 per test)."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import FUZZ_SEED, ROOT
from tinyllama_ft.settings.config import Config, notebook_config, parse_config
from tinyllama_ft.errors import UserError
from tinyllama_ft.settings.generation import GenerationSettings, generation_settings
from tinyllama_ft.training.dpo import DpoConfig, parse_dpo_config

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FIELDS = sorted(f.name for f in dataclasses.fields(Config) if f.init)
# Fields a fuzzer must not set for real: they reach the network or the hub, or start processes.
SKIP = {"push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo", "hub_always_push",
        "hub_revision", "deepspeed", "fsdp", "fsdp_config", "accelerator_config", "parallelism_config",
        "report_to", "torch_compile", "torch_compile_backend", "torch_compile_mode", "debug"}
FUZZED = [f for f in FIELDS if f not in SKIP]

HOSTILE_TEXT = ["nan", "NaN", "inf", "-inf", "+inf", "0", "-0", "-1", "-7.5", "1e308", "1e309", "-1e309",
                "99999999999999999999999", "0.5", "8.5", "1", "true", "false", "none", "None", "null", "",
                " ", "\u00e9t\u00e9", "\u2603", "\x00", "[1, 2]", "{\"a\": 1}", "a,b", "q_proj", "all-linear",
                "../../etc", "x" * 300]
HOSTILE_YAML = [float("nan"), float("inf"), float("-inf"), 0, -1, -7.5, 10**30, 1e308, 0.5, 8.5, 1, True, False,
                None, "", " ", "\u00e9t\u00e9", "nan", "inf", [], [1, 2], ["q_proj"], [None], {"a": 1}, {}, "q_proj",
                "a,b", "all-linear", [[1]], "x" * 300]

text_values = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=12),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str))
yaml_values = st.one_of(st.sampled_from(HOSTILE_YAML), st.floats(allow_nan=True, allow_infinity=True),
                        st.integers(), st.text(max_size=12), st.lists(st.sampled_from(HOSTILE_YAML[:14]), max_size=3))


def check_outcome(build, name):
    """`build()` gives a Config or raises a one-line UserError; anything else is a defect."""
    try:
        config = build()
    except UserError as error:
        message = str(error)
        assert message.strip() and "\n" not in message.strip(), f"{name}: not one line: {message!r}"
        return None
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float):
            assert math.isfinite(value), f"{name}: {field.name} = {value} was accepted"
    return config


BASE = ["--preset", "smoke", "--output_dir", "runs/fuzz-never-written"]


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(FUZZED), value=text_values)
def test_a_flag_with_a_hostile_value(name, value):
    check_outcome(lambda: parse_config([*BASE, f"--{name}", value]), f"--{name} {value!r}")


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(FUZZED), value=yaml_values)
def test_a_yaml_file_with_a_hostile_value(name, value, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(yaml.safe_dump({name: value}, allow_unicode=True), encoding="utf-8")
    check_outcome(lambda: parse_config([*BASE, "--config", str(path)]), f"{name}: {value!r} in YAML")


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(FUZZED), value=yaml_values)
def test_a_python_keyword_with_a_hostile_value(name, value):
    check_outcome(lambda: parse_config(BASE, **{name: value}), f"parse_config({name}={value!r})")


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(FUZZED), value=text_values.filter(lambda v: "\x00" not in v))
def test_a_notebook_variable_with_a_hostile_value(name, value):
    environ = {"TINYLLAMA_FT_PRESET": "smoke", "TINYLLAMA_FT_OUTPUT_DIR": "runs/fuzz-never-written",
               f"TINYLLAMA_FT_{name.upper()}": value}
    check_outcome(lambda: notebook_config({}, environ), f"TINYLLAMA_FT_{name.upper()}={value!r}")


# dpo's door and the generation settings of generate and chat: the same rules, the same fuzzing.
DPO_FIELDS = sorted(f.name for f in dataclasses.fields(DpoConfig) if f.init and f.name not in SKIP)
DPO_BASE = ["--preset", "smoke", "--output_dir", "runs/fuzz-dpo-never-written"]
GENERATION_FIELDS = [f.name for f in dataclasses.fields(GenerationSettings)]


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(DPO_FIELDS), value=text_values)
def test_a_dpo_flag_with_a_hostile_value(name, value):
    check_outcome(lambda: parse_dpo_config([*DPO_BASE, f"--{name}", value]), f"dpo --{name} {value!r}")


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(DPO_FIELDS), value=yaml_values)
def test_a_dpo_yaml_file_with_a_hostile_value(name, value, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "dpo.yaml"
    path.write_text(yaml.safe_dump({name: value}, allow_unicode=True))
    check_outcome(lambda: parse_dpo_config([*DPO_BASE, "--config", str(path)]), f"dpo {name}: {value!r} in YAML")


@seed(FUZZ_SEED)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(GENERATION_FIELDS), value=st.one_of(text_values, yaml_values))
def test_a_generation_setting_with_a_hostile_value(name, value):
    """generate's and chat's flags (text) and the Python API's values: one line, or finite values in range."""
    settings = check_outcome(lambda: generation_settings({name: value}, "flag" if isinstance(value, str) else
                                                         "keyword"), f"{name}={value!r}")
    if settings is not None:
        assert settings.max_new_tokens > 0 and 0 <= settings.temperature <= 2 and 0 < settings.top_p <= 1, settings


SHELL = [("learning_rate", "nan"), ("learning_rate", "inf"), ("lora_r", "8.5"), ("warmup_steps", "-inf"),
         ("num_train_epochs", "nan"), ("fp16", "true"), ("max_grad_norm", "nan"), ("weight_decay", "-1")]


@pytest.mark.parametrize("name, value", SHELL)
def test_the_shell_sees_one_line_or_a_configuration(name, value):
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", "config", *BASE, f"--{name}={value}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 2), result.stderr[-2000:]
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert name in result.stderr and value in result.stderr, result.stderr
