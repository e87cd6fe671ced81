"""What fine-tuning cost: standard benchmarks through lm-evaluation-harness (`lm-eval`), the base model
against the fine-tuned one, on the same tasks with the same settings.

`python -m tinyllama_ft evaluate --adapter DIR` runs here. (Not to be confused with
`evaluation/dolly.py`, the Dolly evaluation that `train` runs: held-out loss, ROUGE, EOS rate.)

* The model is the one `load_saved` gives every command (a run folder, a checkpoint, a DPO run or a
  merged export), handed to lm-eval's own `HFLM`; lm-eval's `simple_evaluate` does the rest. The base
  model is the same loaded `PeftModel` with its adapter switched off (`disable_adapter`: the LoRA
  layers return their base layer's output untouched); for a merged export, the base model it was
  tuned from is loaded beside it.
* Loglikelihood tasks (all the defaults) score plain text, as TinyLlama's own EVAL.md numbers were
  measured: no chat template. `apply_chat_template=True` is lm-eval's path for generative tasks: it
  renders the tokenizer's own chat template (the run's system prompt first, as training did) and
  lm-eval adds the one BOS, so the ids are `encode_prompt`'s (tests/test_harness.py proves it on
  the real TinyLlama tokenizer).
* Results: per task, per metric (lm-eval's names: `acc`, `acc_norm`, ...), value and stderr for
  `base` and `tuned`, and their `difference`; `format_table` and `plot_harness` show them, and the
  model card carries the table.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

# TinyLlama's own evaluation set (EVAL.md of jzhang38/TinyLlama): zero-shot, acc_norm where the task has it.
DEFAULT_TASKS = ("hellaswag", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "boolq", "piqa")
LOCAL_TASKS = Path(__file__).parents[1] / "samples" / "lm_eval"  # the bundled local task, read offline
LOCAL_TASK = "dolly_mc"
INSTALL = 'pip install -e ".[eval]" in the checkout (or pip install "lm-eval>=0.4.13,<0.5")'  # quotes for every shell
HEADLINE = ("acc_norm", "acc", "exact_match", "f1")  # the metric a task's bar shows, first one it has


def require_lm_eval():
    """lm-eval, or one line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"`evaluate` needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """`--tasks a,b`: the names, in order, once each."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise UserError(f"--tasks is empty: name lm-eval tasks, comma-separated (e.g. {','.join(DEFAULT_TASKS[:2])})")
    return names


def results_path(folder: str, out: str | None) -> Path:
    """Where the results go: `out`, or `lm_eval.json` in the evaluated folder (the card then shows them)."""
    path = Path(out) if out else Path(folder) / "lm_eval.json"
    if out and path.suffix != ".json":
        raise UserError(f"--out {out} must end in .json (a .md table and a .png chart are written beside it)")
    if path.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file name ending in .json")
    if not path.parent.is_dir():
        raise UserError(f"the folder of --out {path} does not exist: create it or choose another file")
    return path


def task_manager(include_path: str | None = None):
    """lm-eval's task index: its own tasks, the bundled local task and any under `include_path`."""
    require_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path} is not a folder: pass the folder that holds your task YAML files")
    from lm_eval.tasks import TaskManager

    paths = [str(LOCAL_TASKS)] + ([str(include_path)] if include_path else [])
    return TaskManager(include_path=paths)


def load_tasks(tasks: list[str], manager) -> None:
    """Fail in one line, before any model loads, for an unknown task or one whose data cannot be read
    (the standard tasks download theirs from the hub once; offline, only local tasks run)."""
    from lm_eval.tasks import get_task_dict

    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task {unknown[0]!r}: name one `lm_eval ls tasks` lists, or a task of "
                        f"your own with --include_path DIR (bundled, offline: --tasks {LOCAL_TASK})")
    for name in tasks:
        try:
            get_task_dict([name], manager)
        except Exception as error:  # datasets' hub errors have no common type: any failure to load is this one
            raise UserError(f"could not load the data of task {name!r} ({type(error).__name__}): the standard tasks "
                            "read their datasets from the hub (once; then from the cache); offline, evaluate a local "
                            f"task with --include_path DIR --tasks NAME (bundled: --tasks {LOCAL_TASK})") from None


def evaluate_saved(folder: str, tasks=DEFAULT_TASKS, include_path: str | None = None, limit: int | None = None,
                   batch_size: int | str | None = None, apply_chat_template: bool = False, device: str | None = None,
                   dtype=None) -> dict:
    """Base and fine-tuned model of a saved `folder` on `tasks` with the same settings: the results
    dict `write_results` saves (`base`, `tuned`, `difference`, and what was run)."""
    from ..storage.saved_model import check_saved_folder, load_saved

    check_saved_folder(Path(folder))
    manager = task_manager(include_path)
    load_tasks(list(tasks), manager)
    model, tokenizer = load_saved(folder, device=device, dtype=dtype)
    return evaluate_loaded(model, tokenizer, folder, tasks, manager, limit, batch_size, apply_chat_template)


def evaluate_loaded(model, tokenizer, folder: str, tasks, manager=None, limit: int | None = None,
                    batch_size: int | str | None = None, apply_chat_template: bool = False) -> dict:
    """`evaluate_saved` on a model already loaded from `folder` (`load_saved`), e.g. the notebook's."""
    from ..storage.saved_model import saved_system_prompt

    tasks = list(tasks)
    if manager is None:
        manager = task_manager()
        load_tasks(tasks, manager)
    batch_size = batch_size or default_batch_size(model)
    system = saved_system_prompt(folder) if apply_chat_template else None
    settings = dict(tasks=tasks, limit=limit, batch_size=batch_size, apply_chat_template=apply_chat_template,
                    system_instruction=system)
    seconds = {}
    with _base_of(folder, model) as base_model:
        start = time.perf_counter()
        base = run_lm_eval(base_model, tokenizer, manager, **settings)
        seconds["base"] = time.perf_counter() - start
    start = time.perf_counter()
    tuned = run_lm_eval(model, tokenizer, manager, **settings)
    seconds["tuned"] = time.perf_counter() - start
    return compare(base, tuned, folder=folder, seconds=seconds, device=str(_device_of(model)),
                   dtype=str(next(model.parameters()).dtype).replace("torch.", ""), **settings)


def notebook_tasks(config) -> list[str]:
    """The notebook's tasks: `harness_tasks`, or the bundled local task for smoke runs."""
    from ..report.tables import is_smoke

    return list(config.harness_tasks) or ([LOCAL_TASK] if is_smoke(config) else [])


def forgetting(config, model, tokenizer) -> dict | None:
    """The notebook's "What did it forget?": `evaluate_loaded` on the reloaded run, the results written
    into the run folder (`lm_eval.json`, `.md`, `.png`) and its card; None, saying why, when skipped."""
    tasks = notebook_tasks(config)
    if not tasks:
        log.info("skipped: set harness_tasks (e.g. [\"hellaswag\", \"arc_easy\"]) to run it")
        return None
    if not config.harness_tasks:  # a smoke run's own look, not asked for: no lm-eval is no error
        try:
            require_lm_eval()
        except UserError as error:
            log.info("skipped: %s", error)
            return None
    results = evaluate_loaded(model, tokenizer, config.output_dir, tasks)
    write_results(results, Path(config.output_dir) / "lm_eval.json")
    update_card(config.output_dir)
    return results


def default_batch_size(model) -> int | str:
    """lm-eval's own search for the largest batch that fits on a GPU; 8 on the CPU, where it has none."""
    return "auto" if _device_of(model).type == "cuda" else 8


def _device_of(model):
    return next(model.parameters()).device


class _base_of:
    """The base model of a loaded `model`: its adapter switched off, or for a merged export the model
    it was tuned from (its run's `model_name_or_path`), loaded beside it and freed after."""

    def __init__(self, folder, model):
        self.folder, self.model, self.context = folder, model, None

    def __enter__(self):
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.context = self.model.disable_adapter()
            self.context.__enter__()
            return self.model
        from ..model.loading import load_model
        from ..storage.saved_model import base_model_name

        name = base_model_name(self.folder)
        if Path(name).resolve() == Path(self.folder).resolve():
            raise UserError(f"{self.folder} is a merged export without the run_config.json that names its base "
                            "model: evaluate the run folder it was exported from")
        parameter = next(self.model.parameters())
        self.base = load_model(name, parameter.dtype, device=str(parameter.device)).eval()
        return self.base

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)
        self.base = None
        return False


def run_lm_eval(model, tokenizer, manager, tasks, limit=None, batch_size=8, apply_chat_template=False,
                system_instruction=None) -> dict:
    """lm-eval's `simple_evaluate` on an already loaded model (lm-eval's `HFLM` around it), zero-shot
    unless a task says otherwise; lm-eval's own results dict (without the per-sample logs)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                      apply_chat_template=apply_chat_template, system_instruction=system_instruction,
                                      log_samples=False)
    return results


def task_metrics(results: dict) -> dict:
    """{task: {metric: {"value", "stderr"}}} from lm-eval's results: metric names as lm-eval gives them,
    without the `,none` filter suffix (a metric under another filter keeps its `metric,filter` name)."""
    out = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            name, _, where = key.partition(",")
            if key == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if f"{name}_stderr,{where}" not in values:
                continue  # not a metric (e.g. lm-eval's `sample_len`, the row count)
            stderr = values[f"{name}_stderr,{where}"]
            metrics[name if where in ("", "none") else key] = {
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        out[task] = metrics
    return out


def compare(base: dict, tuned: dict, **settings) -> dict:
    """The results file: what was run, then `base`, `tuned` and `difference` (tuned - base)."""
    import lm_eval

    base_metrics, tuned_metrics = task_metrics(base), task_metrics(tuned)
    difference = {task: {m: tuned_metrics[task][m]["value"] - v["value"] for m, v in metrics.items()
                         if m in tuned_metrics.get(task, {})} for task, metrics in base_metrics.items()}
    samples = {task: n.get("effective") for task, n in tuned.get("n-samples", {}).items()}
    return {"lm_eval_version": lm_eval.__version__, **settings, "num_fewshot": tuned.get("n-shot", {}),
            "samples": samples, "base": base_metrics, "tuned": tuned_metrics, "difference": difference}


def write_results(results: dict, out: str | Path) -> list[Path]:
    """`out` (JSON), and beside it the table (`.md`) and the bar chart (`.png`); each file written
    whole or not at all. Returns the paths."""
    from ..storage.files import replace_json, write_text_file

    out = Path(out)
    replace_json(out, results)
    table, chart = out.with_suffix(".md"), out.with_suffix(".png")
    write_text_file(table, format_table(results).markdown)
    plot_harness(results, save_to=chart)
    return [out, table, chart]




def update_card(folder: str | Path) -> Path | None:
    """Rewrite a run folder's model card with the results it now holds (`lm_eval.json`)."""
    from ..report.card import read_run, write_card
    from ..model.loading import load_tokenizer

    folder = Path(folder)
    if not ((folder / "adapter_config.json").is_file() and (folder / "metrics.json").is_file()):
        return None  # a checkpoint or a merged export: its card (if any) is the run's or the export's own
    run_config, metrics = read_run(folder)
    return write_card(folder, run_config, metrics, load_tokenizer(str(folder)))


def read_results(folder: str | Path) -> dict | None:
    """The `lm_eval.json` a run folder holds, or None."""
    path = Path(folder) / "lm_eval.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


# --- table and chart -------------------------------------------------------------------------------

def format_table(results: dict, save_to=None):
    """The table (`tables.format_harness_table`: the card shows the same): task | metric | base |
    fine-tuned | difference, values ± standard error."""
    from ..report.tables import format_harness_table

    return format_harness_table(results, save_to)


def headline(metrics: dict) -> str | None:
    return next((m for m in HEADLINE if m in metrics), next(iter(metrics), None))


def plot_harness(results: dict, save_to=None):
    """Bars per task (its headline metric: acc_norm, else acc, ...), base beside fine-tuned, with
    error bars of one standard error."""
    import matplotlib.pyplot as plt
    import numpy as np

    from ..report.plots import BASE_COLOR, TUNED_COLOR, _finish

    tasks = [t for t in results["tuned"] if headline(results["tuned"][t]) in results["base"].get(t, {})]
    metrics = [headline(results["tuned"][t]) for t in tasks]
    x, width = np.arange(len(tasks)), 0.38
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(tasks) + 2), 3.6))
    for offset, (label, key, color) in enumerate((("base", "base", BASE_COLOR), ("fine-tuned", "tuned", TUNED_COLOR))):
        values = [results[key][t][m]["value"] for t, m in zip(tasks, metrics)]
        errors = [results[key][t][m].get("stderr") or 0.0 for t, m in zip(tasks, metrics)]
        ax.bar(x + (offset - 0.5) * width, values, width, yerr=errors, capsize=3, label=label, color=color)
    ax.set_xticks(x, [f"{t}\n{m}" for t, m in zip(tasks, metrics)], fontsize=8)
    ax.set_ylabel("score (± 1 standard error)")
    limit = results.get("limit")
    ax.set_title("lm-eval, zero-shot: base vs fine-tuned" + (f" (first {limit} rows a task)" if limit else ""),
                 fontsize=10)
    ax.legend(fontsize=8)
    return _finish(fig, save_to)


# --- the bundled local task ----------------------------------------------------------------------

def build_dolly_mc(rows: list[dict], per_category: int = 16, seed: int = 0,
                   categories=("open_qa", "classification", "brainstorming"), max_chars: int = 160) -> list[dict]:
    """Multiple-choice rows from Dolly rows: a short instruction without context, its own response and
    three responses to other instructions of the same category, in a seeded random order; `answer` is
    the index of the right one. `source` is the row's index in `rows`."""
    rng = random.Random(seed)
    pools = defaultdict(list)
    for index, row in enumerate(rows):
        if row["category"] in categories and not row.get("context", "").strip() \
                and len(row["instruction"]) <= max_chars and len(row["response"]) <= max_chars:
            pools[row["category"]].append(index)
    out = []
    for category in categories:
        picked = rng.sample(pools[category], per_category)
        for index in picked:
            others = rng.sample([i for i in pools[category] if i != index
                                 and rows[i]["response"].strip() != rows[index]["response"].strip()], 3)
            choices = [index, *others]
            rng.shuffle(choices)
            out.append({"question": rows[index]["instruction"].strip(),
                        "choices": [rows[i]["response"].strip() for i in choices],
                        "answer": choices.index(index), "category": category, "source": index})
    return out
