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


# --- the card's commands work when pasted, whatever the folder is called -----------------------------------------

import ast  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402

from hypothesis import given, seed, settings, strategies as st  # noqa: E402

from conftest import FUZZ_SEED  # noqa: E402
from tinyllama_ft.report.commands import ollama_name, usage_section  # noqa: E402

OLLAMA_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,78}[a-z0-9]|[a-z0-9]")
PATHS = [r"runs\tinyllama-dolly", r"C:\Users\Ann O'Neil\runs\my run (v2)", "runs/my run (v2)", 'a "quoted" run',
         "it's $HOME `x`", "runs/ünïcode ✓"]
segment = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=12).filter(
    lambda s: s.strip() and "\x00" not in s)


def commands_of(card: str) -> tuple[list[list[str]], list[ast.Module]]:
    """Each shell command of the card's ```bash blocks as shlex reads it, and each ```python block parsed."""
    blocks = re.findall(r"```(bash|python)\n(.*?)```", card, re.S)
    shell = [shlex.split(line, comments=True) for kind, text in blocks if kind == "bash"
             for line in text.replace("\\\n", " ").splitlines() if line.strip()]
    return shell, [ast.parse(text) for kind, text in blocks if kind == "python"]


def check_usage(run_dir: str, merged_to: str | None = None) -> None:
    here = merged_to or run_dir
    name = here.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    shell, python = commands_of(usage_section(name, run_dir, merged_to))
    adapters = [words[words.index("--adapter") + 1] for words in shell if "--adapter" in words]
    assert adapters and set(adapters) <= {here, run_dir}, (adapters, here)
    outs = {words[words.index("--out") + 1] for words in shell if "--out" in words}
    assert outs == ({run_dir + "-gguf"} if merged_to else {run_dir + "-merged", run_dir + "-gguf"})
    ollama = [words for words in shell if words[0] == "ollama"]
    assert ollama[0][:2] == ["ollama", "create"] and ollama[0][3:] == ["-f", run_dir + "-gguf/Modelfile"]
    assert OLLAMA_NAME.fullmatch(ollama[0][2]) and ollama[1] == ["ollama", "run", ollama[0][2]]
    request = next(words for words in shell if words[0] == "curl")
    assert json.loads(request[request.index("-d") + 1])["model"] == ollama[0][2]
    strings = {node.value for tree in python for node in ast.walk(tree) if isinstance(node, ast.Constant)}
    assert here in strings


@pytest.mark.parametrize("path", PATHS)
def test_each_card_command_parses_and_keeps_a_hard_path_whole(path):
    check_usage(path)
    check_usage("runs/tinyllama-dolly", merged_to=path)
    assert "double quotes" in usage_section("x", path, None)  # the Windows shells' quoting, said once


@seed(FUZZ_SEED)
@settings(max_examples=60, deadline=None)
@given(st.lists(segment, min_size=1, max_size=3), st.booleans(), st.booleans())
def test_card_commands_parse_for_any_folder_name(parts, windows, merged):
    path = ("\\" if windows else "/").join(parts)
    check_usage(path) if not merged else check_usage("runs/x", merged_to=path)


def test_ollama_names_are_valid_and_keep_what_they_can():
    assert ollama_name("my run (v2)") == "my-run-v2" and ollama_name("TinyLlama-Dolly") == "tinyllama-dolly"
    assert ollama_name("((()))") == "tinyllama-ft" and OLLAMA_NAME.fullmatch(ollama_name("x" * 200 + "!"))
