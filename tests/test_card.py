"""The model card: written from the run into the run folder (replacing PEFT's empty template) and
into the merged export; its YAML front matter parses and its model-index holds metrics.json's numbers."""

import json

import pytest
import yaml

from tinyllama_ft import export_merged, generate, load_for_inference
from tinyllama_ft.report.card import render_card
from tinyllama_ft.inference.chat import Chat
from tinyllama_ft.storage.saved_model import load_saved
from tinyllama_ft.model.loading import build_tiny_tokenizer

from runs import stories_run


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def model_index(card: str) -> dict:
    """{(metric type, 'base' | 'fine-tuned'): value} from the card's model-index."""
    (entry,) = front_matter(card)["model-index"]
    (result,) = entry["results"]
    return {(m["type"], m["name"].rsplit(", ", 1)[1]): m["value"] for m in result["metrics"]}


METRICS = {"eval_loss": 1.25, "base_eval_loss": 2.5, "eval_perplexity": 3.49, "base_eval_perplexity": 12.18,
           "eval_tokens": 400, "base_eval_tokens": 400, "rougeL": 0.31, "base_rougeL": 0.12, "bleu": 4.2,
           "base_bleu": 1.1, "eos_rate": 0.95, "base_eos_rate": 0.05, "eos_logprob": -0.4, "base_eos_logprob": -6.2,
           "train_loss": 1.3, "train_steps": 6, "total_parameters": 1000, "trainable_parameters": 10,
           "rows": {"train": 24, "validation": 8, "test": 8, "excluded": 0},
           "per_category": {"base": {"open_qa": {"eval_loss": 2.5, "eval_rows": 8, "rougeL": 0.12, "eos_rate": 0.0,
                                                 "eos_logprob": -6.0, "rows": 8}},
                            "tuned": {"open_qa": {"eval_loss": 1.25, "eval_rows": 8, "rougeL": 0.31, "eos_rate": 1.0,
                                                  "eos_logprob": -0.3, "rows": 8}}}}
CONFIG = {"model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "dataset_name": "databricks/databricks-dolly-15k",
          "output_dir": "runs/tinyllama-dolly", "lora_r": 16, "learning_rate": 2e-4, "max_length": 1024, "seed": 42}


def test_card_front_matter_licence_and_every_paired_metric_including_new_ones():
    card = render_card(CONFIG, METRICS, build_tiny_tokenizer())
    meta = front_matter(card)
    assert meta["base_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and meta["library_name"] == "peft"
    assert meta["license"] == "cc-by-sa-3.0" and meta["datasets"] == ["databricks/databricks-dolly-15k"]
    assert "CC BY-SA 3.0" in card and "ShareAlike binds derivatives" in card
    assert model_index(card) == {(k, model): METRICS[("base_" if model == "base" else "") + k]
                                 for k in ("eval_loss", "eval_perplexity", "rougeL", "bleu", "eos_rate", "eos_logprob")
                                 for model in ("base", "fine-tuned")}
    assert "| eos_logprob | -6.2 | -0.4 |" in card  # a metric this module does not know is still shown
    assert "| open_qa | 8/8 | 2.5 | 1.25 | 0.12 | 0.31 | 0 | 1 | -6 | -0.3 |" in card
    assert "<s><|user|>\nSummarize the paragraph in one sentence.\n\nContext:\n" in card  # the real template, one BOS
    assert "[More Information Needed]" not in card
    other = front_matter(render_card(CONFIG | {"dataset_name": "mine.jsonl"}, METRICS, build_tiny_tokenizer()))
    assert other["license"] == "other" and "datasets" not in other


@pytest.mark.slow
def test_run_folder_and_merged_export_carry_the_card(tmp_path):
    run = stories_run()
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    card = (run / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card and "## Prompt format" in card and "ollama run" in card
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["license"] == "cc-by-sa-3.0"
    index = model_index(card)
    assert {"eval_loss", "eval_perplexity", "rouge1", "rouge2", "rougeL", "bleu", "eos_rate"} <= {k for k, _ in index}
    for (key, model), value in index.items():
        assert value == metrics[key if model == "fine-tuned" else f"base_{key}"], key
    for category in metrics["per_category"]["tuned"]:
        assert f"| {category} |" in card

    merged = export_merged(str(run), str(tmp_path / "merged"))
    merged_card = (merged / "README.md").read_text(encoding="utf-8")
    assert front_matter(merged_card)["library_name"] == "transformers" and "merge_and_unload" in merged_card
    assert model_index(merged_card) == index
    model, tokenizer = load_for_inference(str(run), device="cpu")
    expected = generate(model, tokenizer, "Name three primes.", max_new_tokens=16, progress=False)["text"]
    merged_model, merged_tokenizer = load_saved(str(merged), device="cpu")
    assert Chat(merged_model, merged_tokenizer, max_new_tokens=16).ask("Name three primes.") == expected
