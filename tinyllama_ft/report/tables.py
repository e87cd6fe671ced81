"""What the notebook shows as tables: the environment, the run, the data, metrics, base vs fine-tuned,
where the time went and generations side by side. Each returns a `Rendered` (plain text everywhere, HTML
in Jupyter) and saves Markdown to `save_to` when given. `comparison_rows` is the one base-vs-fine-tuned
table, shared with the model card. Figures are `plots.py`'s."""

from __future__ import annotations

import html
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from ..settings.config import TINY_RANDOM_LLAMA

EOS_COLOR = "#dd8452"  # the EOS in plots.py's figures, the smoke notice's border here
SPLITS = ("train", "validation", "test")
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


class Rendered:
    """Text for terminals and `print`, HTML for Jupyter; `str()` gives the text."""

    def __init__(self, text: str, html_text: str | None = None, markdown: str | None = None):
        self.text, self.html, self.markdown = text, html_text, markdown or text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str | None:
        return self.html


def show_environment() -> Rendered:
    """GPU name and memory, bf16 support, attention kernel and library versions."""
    import torch

    from ..model.loading import default_attention

    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    rows += [(name, _version(name)) for name in LIBRARIES]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append((f"GPU {index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        rows.append(("CUDA", str(torch.version.cuda)))
        rows.append(("bf16 supported", "yes" if torch.cuda.is_bf16_supported() else "no (fp16 will be used)"))
    else:
        rows.append(("GPU", "none visible: the model runs on the CPU (enough for the smoke preset only)"))
        rows.append(("bf16 supported", "no (no CUDA GPU; fp32 on the CPU)"))
    rows.append(("attention", default_attention()))
    rows.append(("CPU cores", str(os.cpu_count())))
    return _table(["", "value"], rows)


def is_smoke(config) -> bool:
    """True for runs whose numbers mean nothing: the smoke preset or the tiny random model. `config`: a
    `Config`, or a run's settings as a dict (`run_config.json`)."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    return get("preset") == "smoke" or get("model_name_or_path") == TINY_RANDOM_LLAMA


def smoke_notice(config) -> Rendered | None:
    """A plain warning for smoke runs (None otherwise, which Jupyter does not display)."""
    if not is_smoke(config):
        return None
    text = ("SMOKE RUN: the model is a tiny random Llama built in code (not TinyLlama) and the data are a "
            "few sample rows. Every number, plot and generation below only shows that the pipeline "
            "works; none of them says anything about fine-tuning quality. Set preset = None (and unset "
            "TINYLLAMA_FT_PRESET) for the real run.")
    return Rendered(text, f'<div style="border-left:6px solid {EOS_COLOR};background:#fff4e5;padding:6px 10px">'
                          f"<b>{html.escape(text.split(':')[0])}:</b>{html.escape(text.split(':', 1)[1])}</div>")


def describe_run(config) -> Rendered:
    """The settings that matter, resolved (preset, cell and environment applied), with the smoke notice."""
    steps = "all" if config.max_steps is None or config.max_steps < 0 else f"{config.max_steps} (max_steps)"
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    schedule = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    every = " / ".join("-" if v is None else f"{v:g}" for v in (config.logging_steps, config.eval_steps,
                                                                  config.save_steps))
    rows = [
        ("preset", str(config.preset)),
        ("model", config.model_name_or_path),
        ("dataset", config.dataset_name),
        ("output_dir", config.output_dir),
        ("rows train / validation / test", f"{config.train_size} / {config.eval_size} / {config.test_size}"),
        ("generated test rows, new tokens", f"{config.num_generate}, {config.max_new_tokens}"),
        ("max_length (longer rows dropped)", str(config.max_length)),
        ("LoRA r / alpha / dropout", f"{config.lora_r} / {config.lora_alpha} / {config.lora_dropout}"
         + "".join(f", {name}" for name, on in (("DoRA", config.use_dora), ("rsLoRA", config.use_rslora)) if on)),
        ("LoRA target modules", ", ".join(config.lora_target_modules)),
        ("batch per device x accumulation", f"{config.per_device_train_batch_size} x "
         f"{config.gradient_accumulation_steps} = {per_step} rows per optimizer step and device"),
        ("learning rate, schedule, warm-up", f"{config.learning_rate:g}, {schedule}, {config.warmup_steps:g}"),
        ("epochs, steps", f"{config.num_train_epochs:g}, {steps}"),
        ("precision, gradient checkpointing", f"{config.precision}, {config.gradient_checkpointing}"),
        ("logging / eval / save every", f"{every} steps"),
        ("seed", str(config.seed)),
    ]
    table = _table(["setting", "value"], rows)
    notice = smoke_notice(config)
    if notice is None:
        return table
    return Rendered(f"{notice.text}\n\n{table.text}", f"{notice.html}{table.html}", table.markdown)


def describe_data(data, config) -> Rendered:
    """Rows loaded, dropped (and why), split sizes, token lengths and the prompt/response token shares."""
    stats = data.stats(config.max_length)
    tokens = stats["tokens"]
    share = stats["response_token_share"]
    rows = [
        ("rows loaded", f"{len(data.rows):,}"),
        ("rows dropped", f"{len(data.excluded):,}" + (" (" + ", ".join(
            f"{n:,} {kind}" + (f" {config.max_length}" if kind == "over max_length" else "")
            for kind, n in stats["excluded_by_reason"].items()) + ")" if data.excluded else "")),
        ("train / validation / test", " / ".join(f"{len(data.split[p]):,}" for p in SPLITS)),
        ("tokens per kept row", f"mean {tokens['mean']:.0f}, median {tokens['median']:.0f}, "
         f"p90 {tokens['p90']:.0f}, max {tokens['max']:,}"),
        ("tokens trained (response + EOS)", f"{share:.0%}"),
        ("tokens masked (prompt, label -100)", f"{1 - share:.0%}"),
    ]
    return _table(["", "value"], rows)


def format_metrics(metrics: dict, digits: int = 4) -> Rendered:
    """The scalar entries of a metrics dict as a two-column table."""
    rows = [(key, format_number(value, digits)) for key, value in metrics.items() if isinstance(value, (int, float))]
    return _table(["metric", "value"], rows)


COMPARED = (("eval_loss", "loss"), ("eval_perplexity", "perplexity"), ("rougeL", "ROUGE-L"), ("eos_rate", "EOS rate"),
            ("eos_logprob", "EOS log-prob"))


def comparison_rows(metrics: dict, keys: list[str] | None = None) -> list[dict]:
    """The one base-vs-fine-tuned table (the notebook's and the model card's): one dict per scope (overall,
    then each category) with `scope`, `rows` (validation/generated rows) and `(key, "base")` and
    `(key, "tuned")` for each metric of `keys` (default: those of `COMPARED`); None where one is missing.
    `metrics` is `summarize(...)`'s dict (or a run's metrics.json)."""
    keys = [key for key, _ in COMPARED] if keys is None else keys
    rows = [{"scope": "overall", "rows": _rows_label(metrics)}
            | {(key, "base"): metrics.get(f"base_{key}") for key in keys}
            | {(key, "tuned"): metrics.get(key) for key in keys}]
    per_category = metrics.get("per_category", {})
    for category in sorted(per_category.get("tuned", {})):
        row = {"scope": category or "(none)"}
        counts = []
        for side in ("base", "tuned"):
            scores = per_category.get(side, {}).get(category, {})
            row |= {(key, side): scores.get(key) for key in keys}
            if side == "tuned":
                counts = [scores.get("eval_rows"), scores.get("rows")]
        row["rows"] = "/".join("-" if c is None else str(c) for c in counts)
        rows.append(row)
    return rows


def format_comparison_table(metrics: dict, save_to=None) -> Rendered:
    """Base vs fine-tuned loss, perplexity, ROUGE-L, EOS rate and EOS log-probability, overall and per category.

    `metrics` is `summarize(...)`'s dict. Loss, perplexity and EOS log-prob (the mean log-probability of
    the EOS that closes each response, teacher-forced) come from the validation rows, ROUGE-L and EOS
    rate from greedy generations on the test rows; `rows` is validation/generated rows."""
    header = ["scope", "rows val/gen"] + [f"{label} {side}" for _, label in COMPARED for side in ("base", "tuned")]
    body = [[row["scope"], row["rows"]] + [format_number(row[(key, side)], 3 if key != "eval_perplexity" else 1)
                                           for key, _ in COMPARED for side in ("base", "tuned")]
            for row in comparison_rows(metrics)]
    table = _table(header, body)
    _save_text(table.markdown, save_to)
    return table


def stage_seconds(timings) -> tuple[dict[str, float], float]:
    """(stage -> seconds, total) from a `Timings` or its `as_dict()` (e.g. metrics["timings"])."""
    timings = dict(timings.as_dict() if hasattr(timings, "as_dict") else timings)
    total = timings.pop("total", None)
    return timings, sum(timings.values()) if total is None else total


def format_timings(timings, save_to=None) -> Rendered:
    """Seconds and share of the total per stage, then what ran outside the stages and the total."""
    stages, total = stage_seconds(timings)
    rows = [(stage, f"{seconds:,.1f}", f"{seconds / total:.0%}" if total else "-") for stage, seconds in stages.items()]
    rows.append(("(outside the stages)", f"{total - sum(stages.values()):,.1f}", ""))
    rows.append(("total (wall time)", f"{total:,.1f}", "100%"))
    table = _table(["stage", "seconds", "share"], rows)
    _save_text(table.markdown, save_to)
    return table


def format_generations(data, base: dict, tuned: dict, n: int = 3, save_to=None, limit: int = 400) -> Rendered:
    """Side by side for `n` test prompts (different categories first): prompt, reference, base, fine-tuned.

    `base` and `tuned` are the dicts of `evaluate_base` / `evaluate_model` (their `generations`)."""
    by_row = {side: {g["row"]: g for g in result.get("generations", [])} for side, result in
              (("base", base), ("tuned", tuned))}
    rows, seen = [], set()
    candidates = [r for r in data.generate_rows if r in by_row["base"] and r in by_row["tuned"]]
    for first_pass in (True, False):
        for index in candidates:
            category = data.conversations[index]["category"]
            if len(rows) < n and index not in rows and (not first_pass or category not in seen):
                rows.append(index)
                seen.add(category)

    def answer(generation: dict) -> str:
        cut = "" if generation["ended"] else "  [no EOS: cut at max_new_tokens]"
        return _clip(generation["response"], limit) + cut

    blocks, html_rows, markdown = [], [], []
    for index in rows:
        messages = data.conversations[index]["messages"]
        earlier = [m for m in messages[:-1] if m["role"] != "system"]
        prompt = (_clip(earlier[0]["content"], limit) if len(earlier) == 1 else
                  "\n\n".join(f"{m['role']}: {_clip(m['content'], limit)}" for m in earlier))
        cells = {"prompt": prompt, "reference": _clip(messages[-1]["content"], limit),
                 "base": answer(by_row["base"][index]), "fine-tuned": answer(by_row["tuned"][index])}
        title = f"row {index} ({data.conversations[index]['category']})"
        blocks.append("\n".join([f"=== {title}"] + [f"--- {k}:\n{v}" for k, v in cells.items()]))
        html_rows.append("<tr>" + f"<td><b>{html.escape(title)}</b><br>" + "</td><td>".join(
            html.escape(v).replace("\n", "<br>") for v in cells.values()) + "</td></tr>")
        markdown.append(f"### {title}\n\n" + "\n\n".join(f"**{k}:**\n\n{v}" for k, v in cells.items()))
    style = 'style="text-align:left;vertical-align:top"'
    head = "".join(f"<th {style}>{h}</th>" for h in ("prompt", "reference", "base", "fine-tuned"))
    result = Rendered("\n\n".join(blocks) or "(no generations)",
                      f"<table><tr>{head}</tr>{''.join(html_rows).replace('<td>', f'<td {style}>')}</table>",
                      "\n\n".join(markdown))
    _save_text(result.markdown, save_to)
    return result


def _save_text(text: str, save_to) -> None:
    if save_to is not None:
        path = Path(save_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


def _table(header: list[str], rows: list) -> Rendered:
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    text = "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])
    cell = 'style="text-align:left"'
    body = "".join("<tr>" + "".join(f"<td {cell}>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    head = "".join(f"<th {cell}>{html.escape(h)}</th>" for h in header)
    return Rendered(text, f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", markdown)


def format_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 10 ** -digits):
        return f"{value:.3e}"
    return f"{value:,.{digits}f}"


def _rows_label(metrics: dict) -> str:
    validation = metrics.get("rows", {}).get("validation", "-")
    tuned = metrics.get("per_category", {}).get("tuned", {})
    generated = sum(c.get("rows", 0) for c in tuned.values()) if tuned else "-"
    return f"{validation}/{generated}"


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --- DPO: before (the SFT model) and after ---------------------------------------------------------

DPO_COMPARED = [("preference_accuracy", "preference accuracy (held-out pairs)"),
                ("reward_accuracy", "reward accuracy vs SFT reference"), ("reward_margin", "reward margin"),
                ("chosen_logprob", "chosen log P / token"), ("rejected_logprob", "rejected log P / token"),
                ("eval_loss", "response loss (SFT validation rows)"), ("eos_logprob", "EOS log P (SFT validation rows)"),
                ("eos_rate", "EOS rate (SFT test generations)")]


def format_dpo_table(metrics: dict, save_to=None) -> Rendered:
    """SFT (before) vs DPO (after): `train_dpo`'s metrics, held-out pairs first, then what alignment cost."""
    body = [[label, format_number(metrics.get(f"sft_{key}")), format_number(metrics.get(key))]
            for key, label in DPO_COMPARED if key in metrics]
    table = _table(["metric", "SFT (before)", "DPO (after)"], body)
    _save_text(table.markdown, save_to)
    return table


# --- lm-evaluation-harness results -----------------------------------------------------------------

def harness_rows(results: dict) -> list[dict]:
    """One row per task and metric: base and tuned value ± stderr, and the difference."""
    rows = []
    for task, metrics in results["tuned"].items():
        for metric, tuned in metrics.items():
            base = results["base"].get(task, {}).get(metric)
            if base is not None:
                rows.append({"task": task, "metric": metric, "base": base, "tuned": tuned,
                             "difference": tuned["value"] - base["value"]})
    return rows


def format_harness_table(results: dict, save_to=None) -> Rendered:
    """`python -m tinyllama_ft evaluate`'s results (`harness.py`, `lm_eval.json`) as the notebook and the
    model card show them: task | metric | base | fine-tuned | difference (values ± standard error)."""
    cell = lambda v: f"{v['value']:.4f}" + (f" ± {v['stderr']:.4f}" if v.get("stderr") is not None  # noqa: E731
                                            and v["stderr"] == v["stderr"] else "")  # NaN: none
    rows = [(r["task"], r["metric"], cell(r["base"]), cell(r["tuned"]), f"{r['difference']:+.4f}")
            for r in harness_rows(results)]
    rendered = _table(["task", "metric", "base", "fine-tuned", "difference"], rows)
    if save_to:
        _save_text(rendered.markdown, save_to)
    return rendered
