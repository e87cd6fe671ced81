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

The names below are imported on first use (`__getattr__`), so that `import tinyllama_ft` and the
command line's `--help` do not wait for torch.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {  # name -> the module that defines it, in the order the data flows
    "UserError": "errors",
    "Config": "config", "notebook_config": "config", "parse_config": "config",
    "format_user_turn": "formats", "load_rows": "formats", "to_example": "formats",
    "encode_example": "encoding", "encode_prompt": "encoding",
    "prepare_data": "data",
    "load_model": "modeling", "load_tokenizer": "modeling", "wrap_lora": "modeling",
    "build_trainer": "train", "fit": "train", "setup_model": "train", "train": "train",
    "evaluate_base": "evaluate", "evaluate_loss": "evaluate", "evaluate_model": "evaluate",
    "score_generations": "evaluate", "summarize": "evaluate",
    "generate": "generation",
    "save_run": "run_folder",
    "load_for_inference": "saved_model", "load_saved": "saved_model",
    "DpoConfig": "dpo", "parse_dpo_config": "dpo", "train_dpo": "dpo", "SAMPLE_PAIRS": "dpo",
    "export_merged": "export",
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
        if isinstance(value, types.ModuleType) and name in _EXPORTS and value.__name__ == f"{__name__}.{name}":
            return  # the module stays in sys.modules, so `from tinyllama_ft.train import STAGES` still works
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
