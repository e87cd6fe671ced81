"""`python -m tinyllama_ft evaluate`: lm-evaluation-harness on the base and the fine-tuned model.

Proved by an independent reader: on stories260k fine-tuned through `train`, our numbers equal those
of lm-eval's own command line (`lm_eval --model hf --model_args pretrained=BASE,peft=RUN`) on the
bundled local task, and the merged export's equal the adapter's (peft#1836 says they may not: the
loglikelihoods are compared too, and their largest difference is the stated tolerance)."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from runs import cli, stories_run

if os.environ.get("REQUIRE_LM_EVAL") != "1":  # CI installs it and sets REQUIRE_LM_EVAL=1: there a missing one fails
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")

from tinyllama_ft import harness  # noqa: E402
from tinyllama_ft.cli import main  # noqa: E402

LIMIT, BATCH = 12, 4  # 48 loglikelihood requests a model: seconds on stories260k


# --- the bundled task ------------------------------------------------------------------------------

def test_bundled_task_rows_are_the_builder_output_on_the_real_dolly_rows(dolly_rows):
    committed = [json.loads(line) for line in (harness.LOCAL_TASKS / "dolly_mc.jsonl").read_text(encoding="utf-8").splitlines()]
    assert committed == harness.build_dolly_mc(dolly_rows)
    for row in committed:
        source = dolly_rows[row["source"]]
        assert row["question"] == source["instruction"].strip() and not source["context"].strip()
        assert row["choices"][row["answer"]] == source["response"].strip()
        assert len(set(row["choices"])) == 4 and row["category"] == source["category"]
    assert {r["category"] for r in committed} == {"open_qa", "classification", "brainstorming"}


def test_chat_template_path_feeds_encode_prompts_ids_with_one_bos(tinyllama_tokenizer, stories_dir):
    """lm-eval's --apply_chat_template renders the tokenizer's template and adds the BOS itself: on the
    real TinyLlama tokenizer its ids (generation and loglikelihood paths) are exactly `encode_prompt`'s."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    from tinyllama_ft.data.encoding import encode_prompt
    from tinyllama_ft.model.loading import load_model

    lm = HFLM(pretrained=load_model(stories_dir), tokenizer=tinyllama_tokenizer, batch_size=1)
    task = get_task_dict([harness.LOCAL_TASK], harness.task_manager())[harness.LOCAL_TASK]
    for doc in list(task.test_docs())[:3]:
        for system in (None, "Answer briefly."):
            context = task.fewshot_context(doc, num_fewshot=0, system_instruction=system, apply_chat_template=True,
                                           chat_template=lm.apply_chat_template)
            messages = [{"role": "system", "content": system}] * bool(system) + [
                {"role": "user", "content": task.doc_to_text(doc)}]
            ours = encode_prompt(tinyllama_tokenizer, messages)
            assert lm.tok_batch_encode([context])[0][0].tolist() == ours  # generate_until's prompt
            assert lm.tok_encode(context) == ours and ours.count(tinyllama_tokenizer.bos_token_id) == 1
            whole, answer = lm._encode_pair(context, " " + doc["choices"][0])  # loglikelihood's split
            assert (whole + answer)[: len(ours)] == ours


# --- results, table, chart, card -------------------------------------------------------------------

RAW = {"results": {"dolly_mc": {"alias": "dolly_mc", "acc,none": 0.25, "acc_stderr,none": 0.125,
                                "acc_norm,none": 0.5, "acc_stderr_norm": 1, "acc_norm_stderr,none": 0.14,
                                "sample_len": 12, "exact_match,strict": 0.1, "exact_match_stderr,strict": "N/A"}}}


def test_task_metrics_keep_lm_evals_names_values_and_stderrs():
    assert harness.task_metrics(RAW) == {"dolly_mc": {
        "acc": {"value": 0.25, "stderr": 0.125}, "acc_norm": {"value": 0.5, "stderr": 0.14},
        "exact_match,strict": {"value": 0.1, "stderr": None}}}


def results_of(base: float, tuned: float) -> dict:
    make = lambda v: {"dolly_mc": {"acc": {"value": v, "stderr": 0.05}, "acc_norm": {"value": v + 0.1, "stderr": 0.06}},  # noqa: E731
                      "boolq": {"acc": {"value": 2 * v, "stderr": 0.01}}}
    return {"lm_eval_version": "0.4.13", "tasks": ["dolly_mc", "boolq"], "limit": 12, "base": make(base),
            "tuned": make(tuned), "difference": {}}


def test_table_chart_and_card_show_base_tuned_and_difference(tmp_path):
    from tinyllama_ft.report.card import render_card
    from tinyllama_ft.model.loading import build_tiny_tokenizer

    results = results_of(0.25, 0.3)
    table = harness.format_table(results).markdown
    assert "| dolly_mc | acc_norm | 0.3500 ± 0.0600 | 0.4000 ± 0.0600 | +0.0500 |" in table
    assert "| boolq | acc | 0.5000 ± 0.0100 | 0.6000 ± 0.0100 | +0.1000 |" in table
    paths = harness.write_results(results, tmp_path / "lm_eval.json")
    assert [p.name for p in paths] == ["lm_eval.json", "lm_eval.md", "lm_eval.png"]
    assert paths[2].stat().st_size > 0 and json.loads(paths[0].read_text(encoding="utf-8"))["tuned"] == results["tuned"]
    figure = harness.plot_harness(results)
    bars = [p.get_height() for p in figure.axes[0].patches]
    assert bars == pytest.approx([0.35, 0.5, 0.4, 0.6])  # acc_norm where a task has it, base then tuned
    card = render_card({"output_dir": "runs/x"}, {}, build_tiny_tokenizer(), harness=results)
    assert "## Benchmarks: what did fine-tuning cost?" in card and table.splitlines()[2] in card


# --- bad input: one line, exit 2, before any model loads ------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--limit", "0"], "--limit must be > 0"),
    (["--batch_size", "big"], "--batch_size must be a whole number > 0 or auto"),
    (["--include_path", "/nonexistent/tasks"], "--include_path /nonexistent/tasks is not a folder"),
    (["--out", "results.txt"], "must end in .json"),
    (["--out", "/nonexistent/r.json"], "does not exist"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}", encoding="utf-8")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, run / "adapter_model.safetensors")  # whole, so the folder passes its checks
    assert main(["evaluate", "--adapter", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--adapter", str(tmp_path / "nothing"), "--tasks", "dolly_mc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_without_lm_eval_evaluate_says_what_to_install():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from tinyllama_ft.cli import main; sys.exit(main(['evaluate', '--adapter', 'runs/x']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: `evaluate` needs lm-evaluation-harness, which is not installed: {harness.INSTALL}"


# --- proof by an independent reader ----------------------------------------------------------------

def lm_eval_cli(out: Path, model_args: str) -> dict:
    """lm-eval's own command line on the bundled task; its results file."""
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--include_path",
         str(harness.LOCAL_TASKS), "--tasks", harness.LOCAL_TASK, "--limit", str(LIMIT), "--batch_size", str(BATCH),
         "--device", "cpu", "--output_path", str(out)], cwd=out.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.rglob("results_*.json")
    return harness.task_metrics(json.loads(path.read_text(encoding="utf-8")))


def assert_same(ours: dict, theirs: dict, tolerance: float) -> None:
    assert ours.keys() == theirs.keys() and ours[harness.LOCAL_TASK].keys() == theirs[harness.LOCAL_TASK].keys()
    for metric, value in theirs[harness.LOCAL_TASK].items():
        for key in ("value", "stderr"):
            assert math.isclose(ours[harness.LOCAL_TASK][metric][key], value[key], rel_tol=0, abs_tol=tolerance), \
                (metric, key, ours[harness.LOCAL_TASK][metric], value)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`evaluate` on a copy of the shared stories260k run (it writes lm_eval.json and the card into it)."""
    run = tmp_path_factory.mktemp("harness") / "run"
    shutil.copytree(stories_run(), run)
    started = time.perf_counter()
    printed = cli("evaluate", "--adapter", run, "--tasks", harness.LOCAL_TASK, "--limit", LIMIT,
                  "--batch_size", BATCH).stdout.splitlines()
    print(f"\nour evaluate (one process, base and tuned): {time.perf_counter() - started:.0f} s")
    return run, printed, json.loads((run / "lm_eval.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_evaluate_equals_the_lm_eval_command_line(evaluated, stories_dir, tmp_path):
    run, printed, ours = evaluated
    assert printed[-4:] == [str(run / n) for n in ("lm_eval.json", "lm_eval.md", "lm_eval.png", "README.md")]
    assert printed[:-4] == str(harness.format_table(ours)).splitlines()  # the table first, as the card shows it
    assert ours["samples"] == {harness.LOCAL_TASK: LIMIT} and ours["num_fewshot"] == {harness.LOCAL_TASK: 0}
    assert "## Benchmarks: what did fine-tuning cost?" in (run / "README.md").read_text(encoding="utf-8")
    started = time.perf_counter()
    tuned = lm_eval_cli(tmp_path / "cli-tuned", f"pretrained={stories_dir},peft={run}")
    base = lm_eval_cli(tmp_path / "cli-base", f"pretrained={stories_dir}")
    print(f"\nlm_eval command line, base and tuned: {time.perf_counter() - started:.0f} s\n"
          f"base {ours['base']}\ntuned {ours['tuned']}")
    assert_same(ours["tuned"], tuned, 1e-6)
    assert_same(ours["base"], base, 1e-6)
    assert ours["tuned"] != ours["base"], "the adapter must change the scores for the comparison to mean anything"


@pytest.mark.slow
def test_merged_export_scores_as_the_adapter(evaluated, tmp_path):
    """peft#1836 says merged and unmerged models may score differently: the metrics, and the
    loglikelihood of every request, of the merged export against the adapter's."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    from tinyllama_ft.storage.saved_model import load_saved

    run, _, ours = evaluated
    merged = tmp_path / "merged"
    cli("export", "--adapter", run, "--out", merged)
    from_merged = harness.evaluate_saved(str(merged), [harness.LOCAL_TASK], limit=LIMIT, batch_size=BATCH)
    print(f"\nmerged {from_merged['tuned']}")
    assert_same(from_merged["base"], ours["base"], 1e-6)  # its base: the run_config's model_name_or_path
    assert_same(from_merged["tuned"], ours["tuned"], 1e-6)

    task = get_task_dict([harness.LOCAL_TASK], harness.task_manager())[harness.LOCAL_TASK]
    task.build_all_requests(limit=LIMIT)
    def loglikelihoods(folder):
        model, tokenizer = load_saved(str(folder), device="cpu")
        return [ll for ll, _ in HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH).loglikelihood(task.instances)]

    scores = [loglikelihoods(run), loglikelihoods(merged)]
    absolute = max(abs(a - b) for a, b in zip(*scores))
    relative = max(abs(a - b) / abs(a) for a, b in zip(*scores))
    print(f"adapter vs merged export, {len(scores[0])} loglikelihoods ({min(map(abs, scores[0])):.1f} to "
          f"{max(map(abs, scores[0])):.1f} nats): largest difference {absolute:.2e} (relative {relative:.2e})")
    assert len(scores[0]) == 4 * LIMIT and relative < 1e-5
