"""What the notebook shows as figures: the data (categories, lengths), the loss mask, the loss curves, the
base-vs-fine-tuned comparison and where the time went. Each saves a PNG to `save_to` (when given) and
returns the matplotlib figure, which Jupyter displays. The tables are `tables.py`'s. Nothing here trains
or changes the model.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from ..data.encoding import IGNORE_INDEX
from ..data.prepare import category_counts, length_stats
from .tables import COMPARED, EOS_COLOR, SPLITS, comparison_rows, format_number, stage_seconds

BASE_COLOR, TUNED_COLOR = "#8c8c8c", "#4c72b0"
PROMPT_COLOR, RESPONSE_COLOR = "#d0d0d0", "#4c72b0"


# --- data --------------------------------------------------------------------------------------


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
                ax.annotate(format_number(value, 3 if key != "eval_perplexity" else 1),
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


def plot_timings(timings, save_to=None):
    """One horizontal bar per stage, in the order the stages ran, labelled with seconds and share."""
    stages, total = stage_seconds(timings)
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


# --- helpers -----------------------------------------------------------------------------------

def _finish(fig, save_to):
    """Save the figure as PNG when asked, detach it from pyplot (no double display), return it."""
    if save_to is not None:
        path = Path(save_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


# --- DPO -----------------------------------------------------------------------------------------

def plot_dpo(metrics: dict, log_history: list[dict], save_to=None):
    """Left: the reward accuracy and margin TRL logs while training. Right: SFT (before) vs DPO (after)
    on the held-out pairs and the SFT validation rows (`tables.DPO_COMPARED`)."""
    from .tables import DPO_COMPARED

    fig, (curve, bars) = plt.subplots(1, 2, figsize=(15, 4.5))
    logged = [e for e in log_history if "rewards/accuracies" in e]
    steps = [e["step"] for e in logged]
    curve.plot(steps, [e["rewards/accuracies"] for e in logged], marker="o", color=TUNED_COLOR, label="reward accuracy")
    curve.plot(steps, [e["rewards/margins"] for e in logged], marker="s", color=BASE_COLOR, label="reward margin")
    curve.set_xlabel("step")
    curve.set_title("DPO training (TRL's logged rewards, training pairs)")
    curve.legend()
    curve.grid(alpha=0.3)
    keys = [(k, label) for k, label in DPO_COMPARED if k in metrics and metrics.get(f"sft_{k}") is not None]
    y = np.arange(len(keys))
    for offset, prefix, color, name in ((-0.2, "sft_", BASE_COLOR, "SFT (before)"), (0.2, "", TUNED_COLOR, "DPO (after)")):
        bars.barh(y + offset, [metrics[f"{prefix}{k}"] for k, _ in keys], height=0.4, color=color, label=name)
    bars.set_yticks(y, [label for _, label in keys])
    bars.invert_yaxis()
    bars.axvline(0, color="black", linewidth=0.8)
    bars.set_title("Before vs after DPO")
    bars.legend()
    fig.tight_layout()
    return _finish(fig, save_to)
