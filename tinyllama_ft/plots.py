"""What the notebook shows, as small functions: the environment, the run, the data, the loss mask,
the loss curves and the base-vs-fine-tuned comparison.

Plotting functions save a PNG to `save_to` (when given) and return the matplotlib figure, which
Jupyter displays. Table functions return a `Rendered` (plain text everywhere, HTML in Jupyter)
and save Markdown to `save_to`. Nothing here trains or changes the model.
"""

from __future__ import annotations

import html
import importlib.metadata
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from .config import TINY_RANDOM_LLAMA
from .data import IGNORE_INDEX, category_counts, length_stats

BASE_COLOR, TUNED_COLOR = "#8c8c8c", "#4c72b0"
PROMPT_COLOR, RESPONSE_COLOR, EOS_COLOR = "#d0d0d0", "#4c72b0", "#dd8452"
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


# --- environment and run ---------------------------------------------------------------------------

def show_environment() -> Rendered:
    """GPU name and memory, bf16 support, attention kernel and library versions."""
    import torch

    from .modeling import default_attention

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
    """True for runs whose numbers mean nothing: the smoke preset or the tiny random model."""
    return config.preset == "smoke" or config.model_name_or_path == TINY_RANDOM_LLAMA


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
        ("LoRA r / alpha / dropout", f"{config.lora_r} / {config.lora_alpha} / {config.lora_dropout}"),
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


# --- data --------------------------------------------------------------------------------------

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


def plot_categories(data, save_to=None):
    """Rows per Dolly category in each split (stacked horizontal bars)."""
    counts = {part: category_counts(data.rows, data.split[part]) for part in SPLITS}
    totals = defaultdict(int)
    for part in SPLITS:
        for category, n in counts[part].items():
            totals[category] += n
    categories = sorted(totals, key=lambda c: totals[c])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(categories) + 1.6))
    left = np.zeros(len(categories))
    for part, color in zip(SPLITS, ("#4c72b0", "#55a868", "#c44e52")):
        values = np.array([counts[part].get(c, 0) for c in categories])
        ax.barh([c or "(none)" for c in categories], values, left=left, color=color,
                label=f"{part} ({values.sum():,})")
        left += values
    for y, total in enumerate(left):
        ax.text(total, y, f" {int(total):,}", va="center", fontsize=9)
    ax.set_xlabel("rows")
    ax.set_title("Dolly categories in each split (stratified)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    ax.set_xlim(0, left.max() * 1.12 if left.size else 1)
    return _finish(fig, save_to)


def row_lengths(data) -> tuple[list[int], list[int]]:
    """(token lengths of all encodable rows, dropped-for-length ones included; trained tokens of kept rows)."""
    trained = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in data.encoded.values()]
    return list(data.lengths.values()), trained


def plot_lengths(data, max_length: int, save_to=None):
    """Histogram of formatted row lengths in tokens, trained tokens beside it, max_length marked."""
    lengths, trained = row_lengths(data)
    stats = length_stats(lengths, max_length)
    top = max(max(lengths), max_length) * 1.03
    bins = np.linspace(0, top, 50)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.hist(lengths, bins=bins, color=PROMPT_COLOR, edgecolor="#9a9a9a", label="whole row (prompt + response)")
    ax.hist(trained, bins=bins, histtype="step", linewidth=2, color=RESPONSE_COLOR,
            label="trained tokens per kept row (response + EOS)")
    ax.axvline(max_length, color=EOS_COLOR, linestyle="--", linewidth=2,
               label=f"max_length = {max_length} ({stats['over_max_length']} rows longer: dropped)")
    share = sum(trained) / max(sum(len(e["input_ids"]) for e in data.encoded.values()), 1)
    ax.text(0.98, 0.62, f"all {stats['rows']:,} rows:\nmean {stats['mean']:.0f}, median {stats['median']:.0f}\n"
            f"p90 {stats['p90']:.0f}, max {stats['max']:,}\n\nkept rows:\ntrained token share {share:.0%}",
            transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="#cccccc"))
    ax.set_xlabel("tokens per formatted row")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths in the chat format")
    ax.legend(loc="upper right", fontsize=9)
    return _finish(fig, save_to)


def pick_example(data, part: str = "train", target_length: int = 120) -> int:
    """A row index worth showing: a row with context whose length is nearest `target_length`."""
    indices = data.split[part] or sorted(data.encoded)
    with_context = [i for i in indices if (data.rows[i].get("context") or data.rows[i].get("input") or "").strip()] or indices
    return min(with_context, key=lambda i: (abs(len(data.encoded[i]["input_ids"]) - target_length), i))


def pick_conversation(data, part: str = "train", target_length: int = 160) -> dict:
    """A multi-turn conversation worth showing (`{"messages": [...]}`): the one of `part` nearest
    `target_length` tokens, or, when the data has none (Dolly), its two shortest rows of `part` joined
    into one two-turn conversation, the system prompt (if any) first."""
    indices = data.split[part] or sorted(data.encoded)
    turns = lambda i: sum(m["role"] == "assistant" for m in data.conversations[i]["messages"])  # noqa: E731
    multi = [i for i in indices if turns(i) > 1]
    if multi:
        index = min(multi, key=lambda i: (abs(len(data.encoded[i]["input_ids"]) - target_length), i))
        return {"messages": data.conversations[index]["messages"]}
    first, second = sorted(indices, key=lambda i: (len(data.encoded[i]["input_ids"]), i))[:2]
    later = [m for m in data.conversations[second]["messages"] if m["role"] != "system"]
    return {"messages": data.conversations[first]["messages"] + later}


def mask_segments(tokenizer, example: dict) -> list[tuple[bool, str]]:
    """The row as (trained?, decoded text) runs, special tokens kept, in order."""
    ids, labels = example["input_ids"], example["labels"]
    segments, start = [], 0
    for position in range(1, len(ids) + 1):
        if position == len(ids) or (labels[position] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:position], skip_special_tokens=False)
            segments.append((labels[start] != IGNORE_INDEX, text))
            start = position
    return segments


def format_loss_mask(tokenizer, example: dict) -> str:
    """The decoded row with the trained tokens wrapped in [[...]]; the rest is prompt (label -100)."""
    return "".join(f"[[{text}]]" if trained else text for trained, text in mask_segments(tokenizer, example))


def show_loss_mask(tokenizer, example: dict, save_to=None, window: int = 7):
    """Print the row with trained text in [[...]]; return a figure of the mask over all positions and
    of the tokens where the prompt ends and where the response ends (with their labels)."""
    ids, labels = example["input_ids"], example["labels"]
    trained = [label != IGNORE_INDEX for label in labels]
    kinds = [0 if not t else 2 if i == tokenizer.eos_token_id else 1 for i, t in zip(ids, trained)]
    n, n_trained = len(ids), sum(trained)
    print(f"{n} tokens: {n - n_trained} prompt tokens (label -100, no loss), {n_trained} trained tokens "
          "(each assistant response + its EOS) shown [[like this]]:\n")
    print(format_loss_mask(tokenizer, example))

    first = trained.index(True) if any(trained) else n
    positions = sorted(set(range(max(first - window, 0), min(first + window, n))) | set(range(max(n - window, 0), n)))
    cmap = ListedColormap([PROMPT_COLOR, RESPONSE_COLOR, EOS_COLOR])
    fig, (strip, table) = plt.subplots(2, 1, figsize=(13, 3.6), gridspec_kw={"height_ratios": [1, 1.5]})
    strip.imshow([kinds], aspect="auto", cmap=cmap, vmin=0, vmax=2, extent=(0, n, 0, 1), interpolation="nearest")
    strip.set_yticks([])
    strip.set_xlabel("token position")
    strip.set_title(f"Loss mask of one training row: {n_trained} of {n} tokens ({n_trained / n:.0%}) are trained")
    strip.legend(handles=[Patch(color=PROMPT_COLOR, label=f"prompt: {n - n_trained} tokens, label -100 (no loss)"),
                          Patch(color=RESPONSE_COLOR, label=f"response: {n_trained - kinds.count(2)} tokens (trained)"),
                          Patch(color=EOS_COLOR, label="EOS </s> (trained: the model learns to stop)")],
                 loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=9, frameon=False)

    cells, colors, columns, previous = [[], []], [], [], None
    for position in positions:
        if previous is not None and position != previous + 1:
            cells[0].append("…"), cells[1].append(""), colors.append("white"), columns.append("")
        cells[0].append(_token_text(tokenizer, ids[position]))
        cells[1].append(str(labels[position]))
        colors.append(cmap(kinds[position]))
        columns.append(str(position))
        previous = position
    table.axis("off")
    grid = table.table(cellText=cells, rowLabels=["token", "label"], colLabels=columns, loc="center",
                       cellLoc="center", cellColours=[colors, colors])
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    grid.scale(1, 1.4)
    table.set_title("where the prompt ends and where the response ends (column = position)", fontsize=9, y=0.95)
    fig.subplots_adjust(hspace=1.0)
    return _finish(fig, save_to)


def _token_text(tokenizer, token_id: int) -> str:
    token = tokenizer.convert_ids_to_tokens(token_id)
    for raw, shown in (("<0x0A>", "\\n"), ("Ċ", "\\n"), ("Ġ", "▁"), ("$", r"\$")):
        token = token.replace(raw, shown)
    return token


# --- training ----------------------------------------------------------------------------------

def plot_loss_curves(log_history: list[dict], save_to=None, base_loss: float | None = None):
    """Training and validation loss per step (from `trainer.state.log_history`) and the learning rate.

    `base_loss`: the base model's validation loss (adapters off), drawn at step 0 for reference."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    rates = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e]
    fig, (ax, lr_ax) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    if train:
        ax.plot(*zip(*train), marker="o", markersize=3, color=TUNED_COLOR, label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", markersize=5, color="#c44e52", label="validation loss (trainer)")
    if base_loss is not None:
        ax.scatter([0], [base_loss], marker="D", s=50, color=BASE_COLOR, zorder=3,
                   label=f"base model, validation ({base_loss:.3f}, token-weighted)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if rates:
        lr_ax.plot(*zip(*rates), color="#55a868")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_title("Learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.grid(alpha=0.3)
    return _finish(fig, save_to)


# --- evaluation --------------------------------------------------------------------------------

def format_metrics(metrics: dict, digits: int = 4) -> Rendered:
    """The scalar entries of a metrics dict as a two-column table."""
    rows = [(key, _number(value, digits)) for key, value in metrics.items() if isinstance(value, (int, float))]
    return _table(["metric", "value"], rows)


COMPARED = (("eval_loss", "loss"), ("eval_perplexity", "perplexity"), ("rougeL", "ROUGE-L"), ("eos_rate", "EOS rate"),
            ("eos_logprob", "EOS log-prob"))


def comparison_rows(metrics: dict) -> list[dict]:
    """One dict per scope (overall, then each category): base and tuned value of each compared metric."""
    rows = [{"scope": "overall", "rows": _rows_label(metrics)}
            | {(key, "base"): metrics.get(f"base_{key}") for key, _ in COMPARED}
            | {(key, "tuned"): metrics.get(key) for key, _ in COMPARED}]
    per_category = metrics.get("per_category", {})
    for category in sorted(per_category.get("tuned", {})):
        row = {"scope": category or "(none)"}
        counts = []
        for side in ("base", "tuned"):
            scores = per_category.get(side, {}).get(category, {})
            row |= {(key, side): scores.get(key) for key, _ in COMPARED}
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
    body = [[row["scope"], row["rows"]] + [_number(row[(key, side)], 3 if key != "eval_perplexity" else 1)
                                           for key, _ in COMPARED for side in ("base", "tuned")]
            for row in comparison_rows(metrics)]
    table = _table(header, body)
    _save_text(table.markdown, save_to)
    return table


def plot_comparison(metrics: dict, save_to=None):
    """Bars of base vs fine-tuned: the compared metrics overall (top), then per category (bottom)."""
    rows = comparison_rows(metrics)
    overall, per_category = rows[0], rows[1:]
    fig = plt.figure(figsize=(18, 9 if per_category else 3.8))
    grid = fig.add_gridspec(2 if per_category else 1, len(COMPARED), height_ratios=[1, 1.9] if per_category else [1])
    for column, (key, label) in enumerate(COMPARED):
        ax = fig.add_subplot(grid[0, column])
        values = [overall[(key, "base")], overall[(key, "tuned")]]
        bars = ax.bar(["base", "fine-tuned"], [np.nan if v is None else v for v in values],
                      color=[BASE_COLOR, TUNED_COLOR])
        for bar, value in zip(bars, values):
            if value is not None:
                ax.annotate(_number(value, 3 if key != "eval_perplexity" else 1),
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=9)
        ax.set_title(label + (" (lower is better)" if key.startswith("eval") else " (higher is better)"), fontsize=10)
        ax.margins(y=0.15)
        if key == "eos_rate":
            ax.set_ylim(0, 1.1)
    if per_category:
        names = [row["scope"] for row in per_category]
        y = np.arange(len(names))
        keys = [(k, l) for k, l in COMPARED if k != "eval_perplexity"]
        sub = grid[1, :].subgridspec(1, len(keys), wspace=0.08)
        for column, (key, label) in enumerate(keys):
            ax = fig.add_subplot(sub[0, column])
            for offset, side, color in ((-0.2, "base", BASE_COLOR), (0.2, "tuned", TUNED_COLOR)):
                values = [np.nan if row[(key, side)] is None else row[(key, side)] for row in per_category]
                ax.barh(y + offset, values, height=0.4, color=color, label="base" if side == "base" else "fine-tuned")
            ax.set_yticks(y, names if column == 0 else [""] * len(names))
            ax.invert_yaxis()
            ax.set_title(f"{label} per category", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            if key == "eos_rate":
                ax.set_xlim(0, 1.05)
    fig.suptitle("Base vs fine-tuned (loss, EOS log-prob: validation rows, teacher-forced; "
                 "ROUGE-L, EOS rate: greedy generations on test rows)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.legend(handles=[Patch(color=BASE_COLOR, label="base (adapters off)"),
                        Patch(color=TUNED_COLOR, label="fine-tuned")], loc="lower center", ncol=2, frameon=False)
    return _finish(fig, save_to)


# --- where the time went ------------------------------------------------------------------------

def _stages(timings) -> tuple[dict[str, float], float]:
    """(stage -> seconds, total) from a `Timings` or its `as_dict()` (e.g. metrics["timings"])."""
    timings = dict(timings.as_dict() if hasattr(timings, "as_dict") else timings)
    total = timings.pop("total", None)
    return timings, sum(timings.values()) if total is None else total


def format_timings(timings, save_to=None) -> Rendered:
    """Seconds and share of the total per stage, then what ran outside the stages and the total."""
    stages, total = _stages(timings)
    rows = [(stage, f"{seconds:,.1f}", f"{seconds / total:.0%}" if total else "-") for stage, seconds in stages.items()]
    rows.append(("(outside the stages)", f"{total - sum(stages.values()):,.1f}", ""))
    rows.append(("total (wall time)", f"{total:,.1f}", "100%"))
    table = _table(["stage", "seconds", "share"], rows)
    _save_text(table.markdown, save_to)
    return table


def plot_timings(timings, save_to=None):
    """One horizontal bar per stage, in the order the stages ran, labelled with seconds and share."""
    stages, total = _stages(timings)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(stages) + 1.4))
    names = list(stages)
    bars = ax.barh(names, [stages[n] for n in names],
                   color=[TUNED_COLOR if n == "train" else EOS_COLOR if n.startswith("evaluate") else BASE_COLOR
                          for n in names])
    for bar, name in zip(bars, names):
        ax.annotate(f" {stages[name]:,.1f} s ({stages[name] / total:.0%})" if total else "",
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (wall clock)")
    ax.set_title(f"Where the run's time went: {total:,.1f} s in all")
    ax.set_xlim(0, max(stages.values(), default=1) * 1.3 or 1)
    return _finish(fig, save_to)


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


# --- helpers -----------------------------------------------------------------------------------

def _finish(fig, save_to):
    """Save the figure as PNG when asked, detach it from pyplot (no double display), return it."""
    if save_to is not None:
        path = Path(save_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


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


def _number(value, digits: int = 4) -> str:
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
