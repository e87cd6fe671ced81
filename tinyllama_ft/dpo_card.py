"""The model card of a DPO run (and of its merged export): both stages, SFT then DPO, and what each measured.

`card.render_card` hands a run whose `run_config.json` says ``"stage": "dpo"`` to `render_dpo_card`; the
prompt format, usage and limitations sections are SFT's own (the prompt is the same).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .card import _cell, _fmt, _model_link, data_section, limitations_section, prompt_section, usage_section

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
                summary(name, base, run_config, sft, metrics, merged_to), stages_section(run_config, sft),
                data_section(sft), pairs_data_section(run_config, metrics),
                prompt_section(tokenizer), results_section(metrics), usage_section(name, run_dir, merged_to),
                limitations_section(metrics)]
    return "\n\n".join(sections) + "\n"


def summary(name: str, base: str, run_config: dict, sft: dict, metrics: dict, merged_to) -> str:
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


def stages_section(run_config: dict, sft: dict) -> str:
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


def results_section(metrics: dict) -> str:
    lines = ["## Results: SFT vs DPO", "", "Held-out pairs, and the SFT run's own validation rows and test generations "
             "(what alignment cost). Before DPO the policy is its reference, so its rewards are 0.", "",
             "| metric | SFT (before) | DPO (after) |", "|---|---|---|"]
    for key, label in {**PAIR_METRICS, **COST_METRICS}.items():
        if key in metrics:
            lines.append(f"| {label} | {_fmt(metrics.get(f'sft_{key}'))} | {_fmt(metrics[key])} |")
    return "\n".join(lines)
