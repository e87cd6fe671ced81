"""Fine-tune TinyLlama-1.1B-Chat on databricks-dolly-15k with LoRA, correctly.

Stages, in the order the notebook calls them::

    config = parse_config(preset="smoke")          # or parse_config([...flags...])
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)         # validate, encode, drop over-long rows, split
    model = setup_model(config)                    # base in compute dtype + LoRA (fp32)
    trainer = build_trainer(config, model, tokenizer, data)
    base = evaluate_base(config, model, tokenizer, data)
    train_metrics = fit(trainer)
    tuned = evaluate_model(config, model, tokenizer, data)
    save_run(...)                                  # or simply: train(config)
    model, tokenizer = load_saved(config.output_dir)   # a run folder, a checkpoint-N or a merged export
    generate(model, tokenizer, "Name three primes.")
    train_dpo(parse_dpo_config(adapter=config.output_dir))   # then preference tuning (DPO) of the run

The package is grouped into wings, lowest first (`WINGS`): a module imports only from `errors`, its own
wing and the wings before it (`tests/test_layout.py` checks it; docs/ARCHITECTURE.md tells the story).
The names below are imported on first use (`__getattr__`), so that `import tinyllama_ft` and the
command line's `--help` do not wait for torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

WINGS = ("settings", "data", "model", "report", "storage", "evaluation", "training", "inference", "export", "bench")


_EXPORTS = {  # name -> the module that defines it, in the order the data flows
    "UserError": "errors",
    "Config": "settings.config", "notebook_config": "settings.config", "parse_config": "settings.config",
    "setup_notebook": "settings.console",
    "format_user_turn": "data.formats", "load_rows": "data.formats", "to_example": "data.formats",
    "encode_example": "data.encoding", "encode_prompt": "data.encoding",
    "prepare_data": "data.prepare",
    "load_model": "model.loading", "load_tokenizer": "model.loading", "wrap_lora": "model.loading",
    "generate": "model.generation",
    "save_run": "storage.run_folder",
    "load_for_inference": "storage.saved_model", "load_saved": "storage.saved_model",
    "evaluate_base": "evaluation.dolly", "evaluate_loss": "evaluation.dolly", "evaluate_model": "evaluation.dolly",
    "score_generations": "evaluation.dolly", "summarize": "evaluation.dolly",
    "build_trainer": "training.sft", "fit": "training.sft", "setup_model": "training.sft", "train": "training.sft",
    "DpoConfig": "training.dpo", "parse_dpo_config": "training.dpo", "train_dpo": "training.dpo",
    "SAMPLE_PAIRS": "training.dpo",
    "export_merged": "export.merged",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


class _Package(types.ModuleType):
    """`train` is a function and the module that defines it: Python records an imported submodule as an
    attribute of its package, which must not replace the function `from tinyllama_ft import train` gives
    (with eager imports the function was bound last; with lazy ones the submodule can come second)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return  # the module stays in sys.modules, so `from tinyllama_ft.train import STAGES` still works
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# --- module paths from before the wings: `from tinyllama_ft.train import Run` keeps working ---------------------
MOVED = {  # old module -> where it lives now (the wings `data`, `export` and `bench` forward their old names)
    "validation": "settings.validation", "config_sources": "settings.sources", "precision": "settings.precision",
    "memory": "settings.memory", "config": "settings.config",
    "formats": "data.formats", "chat_template": "data.chat_template", "encoding": "data.encoding",
    "preference_data": "data.pairs",
    "modeling": "model.loading", "batching": "model.batching", "generation": "model.generation",
    "tables": "report.tables", "card": "report.card", "plots": "report.plots",
    "files": "storage.files", "fingerprint": "storage.fingerprint", "timings": "storage.timings",
    "run_folder": "storage.run_folder", "saved_model": "storage.saved_model",
    "evaluate": "evaluation.dolly", "preference_eval": "evaluation.preferences", "harness": "evaluation.harness",
    "lm_head": "training.lm_head", "train": "training.sft", "dpo": "training.dpo",
    "chat": "inference.chat", "api": "inference.api", "serve": "inference.serve",
    "gguf_export": "export.gguf", "bench_worker": "bench.worker",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `tinyllama_ft.<old>` as the very module it moved to (not a copy), so that names and patches
    are shared; nothing is imported until the old path is."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == __name__ and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass  # the module ran when it was imported under its own name


sys.meta_path.append(_MovedModules())


def forward_to(wing: str, module: str):
    """The `__getattr__` of a wing that bears the name of a module from before the wings (`tinyllama_ft.data`
    was the module `data.prepare` is now): its old names resolve in `module`; submodules import as usual."""

    def __getattr__(name: str):
        if not name.startswith("_") and importlib.util.find_spec(f"{wing}.{name}") is None:
            value = getattr(importlib.import_module(f"{wing}.{module}"), name, _MISSING)
            if value is not _MISSING:
                return value
        raise AttributeError(f"module {wing!r} has no attribute {name!r}")

    return __getattr__


_MISSING = object()


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
