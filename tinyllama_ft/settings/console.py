"""What the user's console shows: streams that print any character on any console, one log format, and the
libraries' warnings known to be noise silenced, each named here once with the reason it is noise.

`python -m tinyllama_ft ... --verbose` (or `quiet_known_noise(verbose=True)`) keeps all of them. A warning
not listed here is shown: it may be about the user's run."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings

# (the warning's category, a regular expression its message starts with, why it is noise)
NOISY_WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT reads transformers' deprecated attribute when it wraps a model; nothing the user can change"),
    (UserWarning, r"Could not find a config file in tiny-random-llama",
     "PEFT looks on the hub for the base model's vocabulary on each save; the tiny random model is built in "
     "memory (no hub id) and its vocabulary is never changed"),
    (UserWarning, r"(?s)Unable to fetch remote file .* in tiny-random-llama",
     "the same look-up for the tiny random model, online"),
]

# (logger, the level below which its records are dropped, why)
NOISY_LOGGERS = [
    ("absl", logging.WARNING, "rouge-score logs each call at INFO"),
]

# (logger, a message start, why): single records of a logger whose other records are kept
NOISY_RECORDS = [
    ("transformers.trainer_utils", "mtime may not be reliable",
     "checkpoints written within a second (the smoke preset) are then sorted by step number, which is right"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed, when installed, is imported by accelerate on a machine without a GPU and says so on standard "
     "output; the run's device is the run's own choice"),
]


class _DropRecords(logging.Filter):
    """Drops a logger's records whose message starts with one of `starts` (a filter stays when a library resets
    its logger's level on import, as DeepSpeed does)."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def make_streams_safe(streams=None) -> None:
    """Standard output and error write a character the console's encoding lacks as `?` instead of raising
    (a cp1252 console and a model's answer, TRL's help in Greek, a path in Cyrillic). The encoding stays the
    console's, so what it can show is shown; files are written as UTF-8 elsewhere, whatever the console."""
    for stream in streams or (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def setup_logging(verbose: bool = False, main_process: bool = True) -> None:
    """One format on standard error; only a multi-process run's main process logs INFO."""
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:
        logging.getLogger("tinyllama_ft").setLevel(logging.DEBUG)
    try:  # huggingface_hub logs through its own handler and the root's: every line twice
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.disable_propagation()
    except ImportError:
        pass


def quiet_known_noise(verbose: bool = False) -> None:
    """Silence what `NOISY_WARNINGS`, `NOISY_LOGGERS` and `NOISY_RECORDS` name, unless `verbose`."""
    if verbose:
        return
    for category, message, _why in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level, _why in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    starts: dict[str, tuple[str, ...]] = {}
    for name, start, _why in NOISY_RECORDS:
        starts[name] = starts.get(name, ()) + (start,)
    for name, prefixes in starts.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(prefixes))


def setup_console(verbose: bool = False) -> None:
    """The command line's console: safe streams, the log format, the known noise silenced."""
    make_streams_safe()
    setup_logging(verbose, main_process=int(os.environ.get("RANK", "0")) == 0)
    quiet_known_noise(verbose)


def setup_notebook(verbose: bool = False) -> None:
    """The notebook's console: the known noise silenced, and a refusal (a `UserError`) shown as its one line in
    the notebook's words (`model_name_or_path`, not `--model_name_or_path`) instead of a traceback. The cell
    still fails, so a headless run stops there."""
    quiet_known_noise(verbose)
    shell = _ipython()
    if shell is None or verbose:
        return
    from ..errors import UserError

    def one_line(shell, etype, value, tb, tb_offset=None):  # IPython's custom handler: it shows the error itself
        print(f"error: {notebook_words(str(value))}", file=sys.stderr)

    shell.set_custom_exc((UserError,), one_line)


def notebook_words(message: str) -> str:
    """A command-line message with its flags as the notebook's parameter names (`--lora_r 8` -> `lora_r 8`)."""
    return re.sub(r"(?<![\w-])--([a-z]\w*)", r"\1", message)


def _ipython():
    module = sys.modules.get("IPython")
    return module.get_ipython() if module is not None else None


def log_settings(log: logging.Logger, config, defaults, skip: tuple[str, ...] = ()) -> None:
    """One line: the settings of `config` that differ from `defaults` (the same kind of configuration, as
    resolved with nothing given) and where the full configuration goes; the full one too when verbose."""
    given, default = json.loads(config.to_json()), json.loads(defaults.to_json())
    changed = {k: v for k, v in given.items() if k not in skip and default.get(k) != v}
    listed = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(changed.items())) or "none"
    log.info("settings other than the defaults: %s (every value goes to %s)", listed,
             os.path.join(config.output_dir, "run_config.json"))
    log.debug("configuration:\n%s", config.to_json())
