"""The model card (`README.md`) of a run folder and of its merged export, written from the run.

YAML front matter the hub reads (base model, licence, datasets, tags and a `model-index` holding
the base and fine-tuned metrics), then: what the model is, its data and licence, the prompt format
with an example rendered through the real chat template, the training configuration, base vs
fine-tuned metrics overall and per category, and how to load, chat with, serve and run it in Ollama.
A DPO run's card (`render_dpo_card`) describes both stages, SFT then DPO, and what each measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ..data.encoding import encode_prompt
from ..data.formats import format_user_turn
from ..settings.paths import recorded, recorded_path
from .commands import usage_section
from .tables import comparison_rows, format_harness_table, is_smoke

DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
# name in the card, and whether higher is better, for the metrics `evaluate_model` writes
KNOWN_METRICS = {
    "eval_loss": ("response loss (validation)", False), "eval_perplexity": ("perplexity (validation)", False),
    "rouge1": ("ROUGE-1 F1 (test generations)", True), "rouge2": ("ROUGE-2 F1 (test generations)", True),
    "rougeL": ("ROUGE-L F1 (test generations)", True), "bleu": ("BLEU (test generations)", True),
    "eos_rate": ("EOS rate (answers ended by the model)", True),
}
NOT_METRICS = ("_tokens", "_rows", "_runtime", "rows")  # counts beside the metrics, not scores
EXAMPLE = {"instruction": "Summarize the paragraph in one sentence.",
           "context": "Dolly is a corpus of 15,000 instruction-following records written by Databricks employees."}


def write_card(folder: str | Path, run_config: dict, metrics: dict, tokenizer, merged_to: str | None = None) -> Path:
    """Write `folder/README.md` (replacing PEFT's empty template) and return its path: the card of
    the run in `run_config["output_dir"]`, or of its merged export when `merged_to` names that folder."""
    path = Path(folder) / "README.md"
    harness = _read_json(Path(folder) / "lm_eval.json")  # `python -m tinyllama_ft evaluate`'s results, if run
    if harness and (Path(folder) / "lm_eval.png").is_file():
        harness = {**harness, "chart": "lm_eval.png"}
    path.write_text(render_card(run_config, metrics, tokenizer, merged_to, harness), encoding="utf-8")
    return path


def render_card(run_config: dict, metrics: dict, tokenizer, merged_to: str | None = None,
                harness: dict | None = None) -> str:
    run_config = recorded(run_config, public=True)  # a card is shared: no path of this machine in it
    merged_to = None if merged_to is None else recorded_path(merged_to)
    if run_config.get("stage") == "dpo":  # a DPO run describes both of its stages
        return render_dpo_card(run_config, metrics, tokenizer, merged_to)
    run_dir = str(run_config.get("output_dir", "runs/model"))
    merged = merged_to is not None
    name = Path(merged_to if merged else run_dir).name
    front = yaml.safe_dump(front_matter(name, run_config, metrics, merged), sort_keys=False, allow_unicode=True)
    sections = [f"---\n{front}---", summary(name, run_config, metrics, merged), data_section(run_config),
                prompt_section(tokenizer), training_section(run_config, metrics), results_section(metrics),
                *([harness_section(harness)] if harness else []), usage_section(name, run_dir, merged_to), limitations_section(metrics)]
    return "\n\n".join(sections) + "\n"


# --- front matter ------------------------------------------------------------------------------

def is_dolly(run_config: dict) -> bool:
    return "dolly" in str(run_config.get("dataset_name", "")).lower()


def front_matter(name: str, run_config: dict, metrics: dict, merged: bool) -> dict:
    base = run_config.get("model_name_or_path", "")
    dataset = run_config.get("dataset_name", "")
    data = {"base_model": base, "library_name": "transformers" if merged else "peft",
            "license": "cc-by-sa-3.0" if is_dolly(run_config) else "other"}
    if dataset == DOLLY_HUB_ID or not Path(dataset).suffix:  # a hub id, not a local file
        data["datasets"] = [dataset]
    data["language"] = ["en"]
    data["pipeline_tag"] = "text-generation"
    data["tags"] = [f"base_model:{'finetune' if merged else 'adapter'}:{base}", "lora", "sft", "trl", "tinyllama-ft",
                    *(["merged"] if merged else ["peft"])]
    results = model_index_metrics(metrics)
    if results:
        data["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Instruction following"},
            "dataset": {"type": dataset, "name": f"{Path(dataset).name} (held-out rows)", "split": "validation+test"},
            "metrics": results}]}]
    return data


def metric_pairs(metrics: dict) -> list[tuple[str, str]]:
    """(name, label) of every metric with a base-model counterpart (`base_<name>`): the known ones
    first, then any other a newer evaluation adds (e.g. `eos_logprob`)."""
    scalar = lambda k: isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)  # noqa: E731
    paired = [k for k in metrics if not k.startswith("base_") and scalar(k) and scalar(f"base_{k}")
              and not k.endswith(NOT_METRICS)]
    known = [k for k in KNOWN_METRICS if k in paired]
    return [(k, KNOWN_METRICS[k][0]) for k in known] + [(k, k) for k in paired if k not in KNOWN_METRICS]


def model_index_metrics(metrics: dict) -> list[dict]:
    entries = []
    for key, label in metric_pairs(metrics):
        for model, value in (("base", metrics[f"base_{key}"]), ("fine-tuned", metrics[key])):
            if math.isfinite(value):
                entries.append({"type": key, "name": f"{label}, {model}", "value": value})
    return entries


# --- body --------------------------------------------------------------------------------------

def summary(name: str, run_config: dict, metrics: dict, merged: bool) -> str:
    base = run_config.get("model_name_or_path", "?")
    what = ("the LoRA adapter merged into the base weights (`merge_and_unload`): a standalone model that loads "
            "with plain `AutoModelForCausalLM`" if merged else
            "a LoRA adapter (PEFT) for the base model; the base weights are not in this folder")
    lines = [f"# {name}", "",
             f"{_model_link(base)} fine-tuned with LoRA on instruction / response pairs of "
             f"`{run_config.get('dataset_name', '?')}` by tinyllama-ft "
             f"(TRL `SFTTrainer`, loss on the responses and their EOS only). This is {what}."]
    if "eval_loss" in metrics and "base_eval_loss" in metrics:
        lines += ["", f"Held-out response loss {metrics['base_eval_loss']:.3f} (base) -> {metrics['eval_loss']:.3f} "
                  f"(fine-tuned)" + (f"; EOS rate {metrics['base_eos_rate']:.2f} -> {metrics['eos_rate']:.2f}"
                                     if "eos_rate" in metrics and "base_eos_rate" in metrics else "") + "."]
    if is_smoke(run_config):
        lines += ["", "**Smoke run**: a tiny random model trained a few steps to check the pipeline; its answers are noise."]
    return "\n".join(lines)


def data_section(run_config: dict) -> str:
    dataset = run_config.get("dataset_name", "?")
    if is_dolly(run_config):
        licence = ("[databricks-dolly-15k](https://huggingface.co/datasets/databricks/databricks-dolly-15k) is "
                   "licensed **CC BY-SA 3.0** (Databricks). ShareAlike binds derivatives: a model trained on it, and "
                   "this model, are shared under CC BY-SA 3.0 with attribution to Databricks. The base model "
                   "TinyLlama-1.1B-Chat-v1.0 is Apache 2.0.")
    else:
        licence = ("The licence of the training data decides the licence of this model: set `license` above to it "
                   "(it says `other` because tinyllama-ft could not tell).")
    return "\n".join([
        "## Data and licence", "",
        f"Training data: `{dataset}`, split by tinyllama-ft into disjoint train / validation / test rows, stratified "
        f"by category (seed {run_config.get('seed', '?')}; the row indices are in `split.json` of the run). Rows "
        f"longer than {run_config.get('max_length', '?')} tokens, or holding special-token text, were dropped, "
        "never truncated.", "", licence])


def prompt_section(tokenizer) -> str:
    messages = [{"role": "user", "content": format_user_turn(EXAMPLE["instruction"], EXAMPLE["context"])}]
    ids = encode_prompt(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered = text if text.startswith(tokenizer.bos_token or "") else (tokenizer.bos_token or "") + text
    return "\n".join([
        "## Prompt format", "",
        "The tokenizer's own chat template (TinyLlama-Chat / Zephyr), with one BOS first, and the user turn built as "
        "the instruction, then `Context:` and the context when there is one. The model answers after "
        f"`<|assistant|>` and ends with `{tokenizer.eos_token}`. These are the exact ids training and inference use "
        "(`tinyllama_ft.encode_prompt`): the text below, as "
        f"{len(ids)} token ids beginning {', '.join(map(str, ids[:6]))}, ...", "", "```text", rendered, "```"])


def training_section(run_config: dict, metrics: dict) -> str:
    fields = ["model_name_or_path", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
              "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "max_length", "precision", "load_in_4bit", "padding_free", "seed",
              "system_prompt"]
    rows = [(f, run_config[f]) for f in fields if f in run_config and run_config[f] not in (None, "")]
    rows[2:2] = [(f, True) for f in ("use_dora", "use_rslora") if run_config.get(f)]  # after the rank, when on
    facts = [("effective batch size", metrics.get("effective_batch_size")), ("processes", metrics.get("world_size")),
             ("optimizer steps", metrics.get("train_steps")), ("rows", metrics.get("rows")),
             ("trainable parameters", _count(metrics, "trainable_parameters", "total_parameters")),
             ("training tokens", metrics.get("train_tokens")),
             ("runtime (s)", _round(metrics.get("train_runtime"))),
             ("real tokens / s", _round(metrics.get("train_tokens_per_second"))),
             ("final training loss", _round(metrics.get("train_loss"), 4))]
    rows += [(k, v) for k, v in facts if v is not None]
    lines = ["## Training configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    lines += ["", "The whole resolved configuration is `run_config.json` in the run folder."]
    return "\n".join(lines)


def results_section(metrics: dict) -> str:
    pairs = metric_pairs(metrics)
    overall = comparison_rows(metrics, [key for key, _ in pairs])[0]
    lines = ["## Results: base vs fine-tuned", "",
             "The same held-out rows for both: loss and perplexity over the response tokens of the validation rows, "
             "greedy generations on test rows for ROUGE / BLEU / EOS rate (the base model is the same weights with the "
             "adapter switched off).", "", "| metric | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {label} | {_fmt(overall[(key, 'base')])} | {_fmt(overall[(key, 'tuned')])} |" for key, label in pairs]
    per = metrics.get("per_category") or {}
    base, tuned = per.get("base", {}), per.get("tuned", {})
    categories = sorted(set(base) & set(tuned))
    if categories:
        keys = [k for k in ("eval_loss", "eval_perplexity", "rougeL", "bleu", "eos_rate")
                if any(k in tuned[c] for c in categories)]
        keys += sorted({k for c in categories for k, v in tuned[c].items() if isinstance(v, (int, float))
                        and k not in keys and k not in KNOWN_METRICS and not k.endswith(NOT_METRICS)
                        and k in base[c]})
        short = {"eval_loss": "loss", "eval_perplexity": "ppl", "rougeL": "ROUGE-L", "bleu": "BLEU", "eos_rate": "EOS rate"}
        header = " | ".join(f"{short.get(k, k)} base | {short.get(k, k)} tuned" for k in keys)
        lines += ["", "Per category (validation rows / test generations):", "",
                  f"| category | rows (val/gen) | {header} |", "|---|---|" + "---|---|" * len(keys)]
        for row in comparison_rows(metrics, keys)[1:]:
            cells = " | ".join(f"{_fmt(row[(k, 'base')])} | {_fmt(row[(k, 'tuned')])}" for k in keys)
            lines.append(f"| {row['scope']} | {row['rows']} | {cells} |")
    return "\n".join(lines)


def harness_section(results: dict) -> str:
    """`python -m tinyllama_ft evaluate`'s table: lm-eval tasks, base vs fine-tuned, ± standard error."""
    limit = results.get("limit")
    lines = ["## Benchmarks: what did fine-tuning cost?", "",
             f"lm-evaluation-harness {results.get('lm_eval_version', '')} on the base model (adapter off) and the "
             "fine-tuned one, same tasks and settings, zero-shot"
             + (f", the first {limit} rows of each task" if limit else "")
             + (", prompts in the chat template" if results.get("apply_chat_template") else
                ", plain text (no chat template)") + " (`python -m tinyllama_ft evaluate`; `lm_eval.json`).", "",
             format_harness_table(results).markdown]
    if results.get("chart"):
        lines += ["", f"![base vs fine-tuned]({results['chart']})"]
    return "\n".join(lines)


def limitations_section(metrics: dict) -> str:
    size = f"{metrics['total_parameters']:,}-parameter" if "total_parameters" in metrics else "small"
    return "\n".join([
        "## Limitations", "",
        f"A {size} model tuned on a few thousand instruction rows at most: at best it follows simple instructions and ends its "
        "answers, but it makes facts up and knows nothing after its pretraining data. Dolly's responses were written "
        "by people and carry their biases. Check answers before relying on them."])


def _model_link(name: str) -> str:
    local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1
    return f"`{name}`" if local else f"[{name}](https://huggingface.co/{name})"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _round(value, digits: int = 1):
    return None if value is None else round(float(value), digits)


def _count(metrics: dict, part: str, whole: str) -> str | None:
    if part not in metrics or whole not in metrics:
        return None
    return f"{metrics[part]:,} of {metrics[whole]:,} ({100 * metrics[part] / metrics[whole]:.2f}%)"


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None


def read_run(folder: str | Path) -> tuple[dict, dict]:
    """(run_config, metrics) of a run folder; empty where a file is missing."""
    read = lambda name: json.loads((Path(folder) / name).read_text(encoding="utf-8")) \
        if (Path(folder) / name).is_file() else {}  # noqa: E731
    return read("run_config.json"), read("metrics.json")


# --- DPO runs: both stages ---------------------------------------------------------------------
PAIR_METRICS = {"preference_accuracy": "preference accuracy (mean per-token log P, chosen > rejected)",
                "reward_accuracy": "reward accuracy (implicit reward vs the SFT reference, as TRL)",
                "reward_margin": "reward margin (chosen - rejected reward)",
                "chosen_logprob": "chosen log P per token", "rejected_logprob": "rejected log P per token"}
COST_METRICS = {"eval_loss": "response loss (SFT validation rows)", "eos_logprob": "EOS log P (SFT validation rows)",
                "eos_rate": "EOS rate (SFT test generations)", "rougeL": "ROUGE-L (SFT test generations)"}


def render_dpo_card(run_config: dict, metrics: dict, tokenizer, merged_to: str | None = None) -> str:
    sft = run_config.get("sft_run_config") or {}
    run_dir = str(run_config.get("output_dir", "runs/model-dpo"))
    name = Path(merged_to or run_dir).name
    base = run_config.get("model_name_or_path") or sft.get("model_name_or_path", "?")
    front = {"base_model": base, "library_name": "transformers" if merged_to else "peft",
             "license": "cc-by-sa-3.0" if "dolly" in str(sft.get("dataset_name", "")).lower() else "other",
             "language": ["en"], "pipeline_tag": "text-generation",
             "tags": ["lora", "sft", "dpo", "trl", "tinyllama-ft", "merged" if merged_to else "peft"]}
    sections = [f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---",
                dpo_summary(name, base, run_config, sft, metrics, merged_to), dpo_stages_section(run_config, sft),
                data_section(sft), pairs_data_section(run_config, metrics),
                prompt_section(tokenizer), dpo_results_section(metrics), usage_section(name, run_dir, merged_to),
                limitations_section(metrics)]
    return "\n\n".join(sections) + "\n"


def dpo_summary(name: str, base: str, run_config: dict, sft: dict, metrics: dict, merged_to) -> str:
    what = ("the DPO-tuned LoRA adapter merged into the base weights: a standalone model" if merged_to else
            "a LoRA adapter (PEFT) for the base model: the SFT adapter, continued by DPO")
    lines = [f"# {name}", "", f"{_model_link(base)} in two stages by tinyllama-ft: supervised fine-tuning with LoRA on "
             f"`{sft.get('dataset_name', '?')}` (TRL `SFTTrainer`, run `{run_config.get('adapter', '?')}`), then "
             f"preference tuning (DPO, TRL `DPOTrainer`) of the same adapter on `{run_config.get('dataset_name', '?')}`, "
             f"against the SFT model as reference. This is {what}."]
    if "preference_accuracy" in metrics and "sft_preference_accuracy" in metrics:
        lines += ["", f"Held-out preference accuracy {metrics['sft_preference_accuracy']:.3f} (SFT) -> "
                  f"{metrics['preference_accuracy']:.3f} (DPO); reward accuracy {metrics.get('reward_accuracy', 0):.3f}, "
                  f"reward margin {metrics.get('reward_margin', 0):.3f}."]
    if run_config.get("preset") == "smoke" or base == "tiny-random-llama":
        lines += ["", "**Smoke run**: a tiny model trained a few steps to check the pipeline; its answers are noise."]
    return "\n".join(lines)


def dpo_stages_section(run_config: dict, sft: dict) -> str:
    sft_fields = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate", "max_steps",
                  "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed"]
    dpo_fields = ["beta", "loss_type", "learning_rate", "lr_scheduler_type", "warmup_steps", "max_steps",
                  "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                  "precompute_ref_log_probs", "precision", "seed"]
    lines = ["## Training: two stages", "", "| setting | 1. SFT | 2. DPO |", "|---|---|---|"]
    for key in dict.fromkeys(sft_fields + dpo_fields):
        lines.append(f"| {key} | {_cell(sft.get(key, '-')) if key in sft_fields else '-'} | "
                     f"{_cell(run_config.get(key, '-')) if key in dpo_fields else '-'} |")
    lines += ["", "DPO continues the SFT adapter (same LoRA shape, same base weights, frozen); the reference is a frozen "
              "copy of the SFT adapter. Both configurations are in `run_config.json` (the SFT one under "
              "`sft_run_config`)."]
    return "\n".join(lines)


def pairs_data_section(run_config: dict, metrics: dict) -> str:
    dataset = str(run_config.get("dataset_name", "?"))
    licence = ("HuggingFaceH4/orca_dpo_pairs is licensed MIT." if "orca_dpo_pairs" in dataset else
               "The bundled sample pairs are built from Dolly rows (CC BY-SA 3.0, Databricks)." if "sample_pairs" in dataset
               else "Check the licence of the preference data.")
    excluded = metrics.get("excluded_by_reason") or {}
    return "\n".join(["## Preference data", "", f"Pairs: `{dataset}` (split `{run_config.get('dataset_split')}`), "
                      f"rows {_cell(metrics.get('rows', '-'))}; pairs refused: {_cell(excluded) or 'none'}. Both "
                      "responses are trained after exactly the prompt inference uses, each ending with its EOS. "
                      + licence])


def dpo_results_section(metrics: dict) -> str:
    lines = ["## Results: SFT vs DPO", "", "Held-out pairs, and the SFT run's own validation rows and test generations "
             "(what alignment cost). Before DPO the policy is its reference, so its rewards are 0.", "",
             "| metric | SFT (before) | DPO (after) |", "|---|---|---|"]
    for key, label in {**PAIR_METRICS, **COST_METRICS}.items():
        if key in metrics:
            lines.append(f"| {label} | {_fmt(metrics.get(f'sft_{key}'))} | {_fmt(metrics[key])} |")
    return "\n".join(lines)
