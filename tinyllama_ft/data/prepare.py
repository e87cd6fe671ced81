"""The data stage, whole: load and format the rows (`formats`), encode them (`encoding`), drop what
cannot be used (counted by reason), split them and measure them: `prepare_data(config, tokenizer)`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .encoding import check_system_prompt, encode_rows
from .formats import load_rows, to_conversations

if TYPE_CHECKING:
    from datasets import Dataset

    from ..settings.config import Config

log = logging.getLogger(__name__)


@dataclass
class Data:
    """The rows (columns renamed as `columns` says), their conversations (`to_conversation`), their
    encodings, what was excluded and why, and the split (row indices)."""

    rows: list[dict]
    encoded: dict[int, dict]
    excluded: dict[int, str]
    split: dict[str, list[int]]
    lengths: dict[int, int] = field(default_factory=dict)  # token length of every encodable row, kept or not
    generate_rows: list[int] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)  # one per row: {"messages": [...], "category": str}

    def examples(self, part: str) -> list[dict]:
        return [self.encoded[i] for i in self.split[part]]

    def dataset(self, part: str) -> Dataset:
        from datasets import Dataset

        return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in self.examples(part)])

    def stats(self, max_length: int) -> dict:
        lengths = [len(e["input_ids"]) for e in self.encoded.values()]
        return {"tokens": length_stats(list(self.lengths.values()), max_length), "excluded": len(self.excluded),
                "excluded_by_reason": exclusion_counts(self.excluded),
                "categories": {part: category_counts(self.rows, idx) for part, idx in self.split.items()},
                "response_token_share": sum(sum(l != -100 for l in e["labels"]) for e in self.encoded.values())
                / max(sum(lengths), 1)}


def tokenization_cache_dir() -> Path:
    """Under the datasets cache, so that HF_DATASETS_CACHE / HF_HOME move it with the rest."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "tinyllama_ft"


def prepare_data(config: Config, tokenizer) -> Data:
    """Load, validate, format (any `dataset_format`, with the `system_prompt`), encode and split the rows;
    rows that cannot be used (over `max_length`, special-token text, broken conversations) are dropped
    and counted by reason."""
    rows = load_rows(config.dataset_name, config.dataset_config, config.dataset_split, config.columns,
                     config.dataset_format)
    wanted = config.train_size + config.eval_size + config.test_size
    if wanted > len(rows):
        raise UserError(f"train_size + eval_size + test_size = {wanted} but {config.dataset_name} has only "
                        f"{len(rows)} rows: lower the sizes")
    check_system_prompt(config.system_prompt, tokenizer)
    conversations = to_conversations(rows, config.dataset_format, config.system_prompt)
    encoded, excluded, lengths = encode_rows(tokenizer, conversations, config.max_length,
                                             cache_dir=tokenization_cache_dir() if config.tokenization_cache else None)
    reasons = exclusion_counts(excluded)
    if not encoded:
        if set(reasons) == {"over max_length"}:
            raise UserError(f"no row of {config.dataset_name} fits in max_length {config.max_length} "
                            f"(first: {next(iter(excluded.values()))}): raise max_length")
        raise UserError(f"no usable row in {config.dataset_name} ({_counted(reasons)}; first: row "
                        f"{next(iter(excluded))}, {next(iter(excluded.values()))}): fix the rows or --dataset_format")
    if excluded:
        log.info("excluded %d of %d rows: %s (first: row %d, %s)", len(excluded), len(rows), _counted(reasons),
                 *next(iter(excluded.items())))
    split = split_rows(conversations, sorted(encoded), config.train_size, config.eval_size, config.test_size,
                       config.seed)
    generate_rows = stratified_sample(conversations, split["test"], config.num_generate, random.Random(config.seed))
    return Data(rows, encoded, excluded, split, lengths, generate_rows, conversations)


def _counted(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in reasons.items())


def exclusion_counts(excluded: dict[int, str]) -> dict[str, int]:
    """How many rows were excluded for each kind of reason, most frequent first."""
    def kind(reason: str) -> str:
        if "max_length" in reason:
            return "over max_length"
        if "special string" in reason:
            return "special-token text"
        return reason.split(":")[0]

    return dict(Counter(kind(reason) for reason in excluded.values()).most_common())


def length_stats(lengths: list[int], max_length: int | None = None) -> dict:
    """Mean, median, p90, p99 and max of token lengths, and how many exceed `max_length`."""
    values = np.asarray(lengths)
    stats = {"rows": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
             "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
             "max": int(values.max())}
    if max_length is not None:
        stats["over_max_length"] = int((values > max_length).sum())
    return stats


# --- split -------------------------------------------------------------------------------------

def split_rows(rows: list[dict], indices: list[int], train_size: int, eval_size: int, test_size: int,
               seed: int) -> dict[str, list[int]]:
    """Disjoint train/validation/test row indices, stratified by category when rows have one.

    Validation and test are held out first; train is drawn from the rest. Deterministic in `seed`."""
    if eval_size + test_size >= len(indices):
        raise UserError(f"eval_size + test_size = {eval_size + test_size} leaves no training rows out of "
                        f"{len(indices)} usable rows: lower them")
    rng = random.Random(seed)
    rest = sorted(indices)
    held = stratified_sample(rows, rest, eval_size + test_size, rng)
    rest = sorted(set(rest) - set(held))
    if train_size > len(rest):
        raise UserError(f"train_size {train_size} is larger than the {len(rest)} rows left after the "
                        f"held-out splits: lower train_size to at most {len(rest)}")
    validation = stratified_sample(rows, held, eval_size, rng)
    test = sorted(set(held) - set(validation))
    train = stratified_sample(rows, rest, train_size, rng)
    return {"train": train, "validation": validation, "test": test}


def stratified_sample(rows: list[dict], pool: list[int], n: int, rng: random.Random) -> list[int]:
    """`n` indices from `pool`, each category getting its share (largest remainder), sorted."""
    groups = defaultdict(list)
    for index in sorted(pool):
        groups[rows[index].get("category", "")].append(index)
    quotas = {cat: n * len(members) / len(pool) for cat, members in groups.items()}
    counts = {cat: int(q) for cat, q in quotas.items()}
    for cat in sorted(quotas, key=lambda c: (counts[c] - quotas[c], c))[: n - sum(counts.values())]:
        counts[cat] += 1
    chosen = []
    for cat in sorted(groups):
        chosen += rng.sample(groups[cat], counts[cat])
    return sorted(chosen)


def category_counts(rows: list[dict], indices: list[int]) -> dict[str, int]:
    return dict(Counter(rows[i].get("category", "") for i in indices).most_common())
