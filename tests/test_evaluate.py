"""Evaluation: the fast paths give the numbers of the old ones, `eos_logprob` is what it says, and a
run's timings add up.

* `evaluate_loss` with the LM head only at labelled positions (the default) equals the full-logit
  loss (`labelled_only=False`, the code before) on the real stories260k with real Dolly rows, LoRA on
  and off, overall and per category, `eos_logprob` too;
* `eos_logprob` equals a hand computation from the full logits on literal rows;
* generation in batches of 32 with the LoRA merged gives the texts of batches of 8 unmerged, continuous
  batching (the default) the greedy tokens of static batches, without walking the caller's heap in its garbage
  collections, and
  the merge leaves the base weights exactly as they were;
* `train` writes `timings` whose stages add up to its wall time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import time
from pathlib import Path

import pytest
import torch

from tinyllama_ft import encode_example, load_model, load_tokenizer, parse_config, to_example, train, wrap_lora
from tinyllama_ft.evaluation.dolly import evaluate_loss, pad_batch
from tinyllama_ft.model.generation import can_merge_lora, generate, merged_lora
from tinyllama_ft.storage.timings import Timings, peak_memory, reset_peak_memory

# Loss sums here are ~10^4 nats over ~3,000 tokens; the two paths differ by fp32 rounding in the LM-head
# matmul and the log-softmax only (observed relative difference ~1e-7).
RTOL = 1e-5


@pytest.fixture(scope="module")
def stories(stories_dir, dolly_rows):
    """stories260k with LoRA whose B is random (LoRA on then differs from off), and 24 real Dolly rows."""
    tokenizer = load_tokenizer(stories_dir)
    model = wrap_lora(load_model(stories_dir), r=8, alpha=16, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    encoded = [(r, encode_example(tokenizer, to_example(r))) for r in dolly_rows[::9]]
    kept = [(r, e) for r, e in encoded if len(e["input_ids"]) <= 400][:24]  # stories260k's context is 512
    rows, examples = [r for r, _ in kept], [e for _, e in kept]
    return model.eval(), tokenizer, examples, [r["category"] for r in rows], rows


@pytest.mark.parametrize("adapters", ["on", "off"])
def test_labelled_only_loss_equals_full_logits(stories, adapters):
    model, tokenizer, examples, categories, _ = stories
    kwargs = dict(batch_size=5, groups=categories, eos_token_id=tokenizer.eos_token_id, progress=False)
    with model.disable_adapter() if adapters == "off" else torch.no_grad():
        fast = evaluate_loss(model, examples, tokenizer.pad_token_id, labelled_only=True, **kwargs)
        full = evaluate_loss(model, examples, tokenizer.pad_token_id, labelled_only=False, **kwargs)
    assert fast["tokens"] == full["tokens"] == sum(sum(l != -100 for l in e["labels"]) for e in examples)
    assert fast["eos_tokens"] == full["eos_tokens"] == len(examples)  # one closing EOS per response
    assert fast["loss"] == pytest.approx(full["loss"], rel=RTOL)
    assert fast["eos_logprob"] == pytest.approx(full["eos_logprob"], rel=RTOL)
    assert set(fast["per_group"]) == set(categories) and len(fast["per_group"]) > 3
    for name, group in full["per_group"].items():
        assert fast["per_group"][name]["tokens"] == group["tokens"]
        assert fast["per_group"][name]["loss"] == pytest.approx(group["loss"], rel=RTOL), name
        assert fast["per_group"][name]["eos_logprob"] == pytest.approx(group["eos_logprob"], rel=RTOL), name


def test_adapters_change_the_loss_so_the_comparison_above_means_something(stories):
    model, tokenizer, examples, _, _ = stories
    on = evaluate_loss(model, examples, tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, progress=False)
    with model.disable_adapter():
        off = evaluate_loss(model, examples, tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            progress=False)
    assert abs(on["loss"] - off["loss"]) > 1e-3 and abs(on["eos_logprob"] - off["eos_logprob"]) > 1e-3


def test_eos_logprob_is_the_mean_log_probability_of_each_labelled_eos(stories):
    """Literal rows, one with the EOS labelled twice (two assistant turns), one with it masked: the
    mean over exactly the labelled EOS positions of log_softmax(full logits)[t, EOS]."""
    model, tokenizer, _, _, _ = stories
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [  # input ids, labels (-100 = not scored)
        ([1, 300, 301, 302, eos, 303, 304, eos], [-100, -100, -100, -100, -100, 303, 304, eos]),
        ([1, 310, 311, eos, 312, eos, 313, 314, eos], [-100, -100, 311, eos, -100, -100, 313, 314, eos]),
        ([1, 320, 321, eos, 322], [-100, -100, 321, -100, 322]),  # the EOS here is prompt: not counted
    ]
    examples = [{"input_ids": i, "labels": l} for i, l in rows]
    result = evaluate_loss(model, examples, pad, batch_size=2, eos_token_id=eos, progress=False)
    expected, nll = [], []
    with torch.no_grad():
        for ids, labels in rows:
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    nll.append(-log_probs[t - 1, labels[t]].item())
                    if labels[t] == eos:
                        expected.append(log_probs[t - 1, eos].item())
    assert result["eos_tokens"] == len(expected) == 3
    assert result["eos_logprob"] == pytest.approx(sum(expected) / 3, rel=RTOL)
    assert result["loss"] == pytest.approx(sum(nll) / len(nll), rel=RTOL) and result["tokens"] == len(nll)
    assert result["eos_logprob"] < 0
    no_eos = evaluate_loss(model, examples[2:], pad, eos_token_id=eos, progress=False)
    assert no_eos["eos_tokens"] == 0 and no_eos["eos_logprob"] is None
    assert "eos_logprob" not in evaluate_loss(model, examples, pad, progress=False)


def test_merged_generation_in_big_batches_gives_the_same_texts_and_restores_the_weights(stories):
    model, tokenizer, _, _, rows = stories
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    instructions, contexts = [r["instruction"] for r in rows[:12]], [r["context"] for r in rows[:12]]
    assert can_merge_lora(model)
    old = generate(model, tokenizer, instructions, contexts, max_new_tokens=24, batch_size=8, merge_lora=False,
                   progress=False, batching="static")
    new = generate(model, tokenizer, instructions, contexts, max_new_tokens=24, progress=False,
                   batching="static")  # 32, merged
    assert [g["text"] for g in new] == [g["text"] for g in old] and all(g["text"] for g in new)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # bit for bit
    batch = pad_batch([encode_example(tokenizer, to_example(r)) for r in rows[:4]], tokenizer.pad_token_id, "cpu")
    batch.pop("labels")
    with torch.no_grad():
        unmerged = model(**batch).logits
        with merged_lora(model):
            merged = model(**batch).logits
    print(f"merged vs unmerged logits: max abs difference {(merged - unmerged).abs().max().item():.2e}")
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)  # fp32 rounding of W + BA
    with model.disable_adapter():
        assert not can_merge_lora(model)  # the base model: nothing to merge


@pytest.mark.parametrize("adapters", ["on", "off"])
def test_continuous_batching_gives_the_greedy_tokens_of_static_batches(stories, adapters):
    """The default (continuous batching: finished answers leave the batch) against `model.generate` in static
    batches, on the real pretrained stories260k (its answers run to the budget here: answers that end early are
    exercised by benchmarks/eval_paths.py's forced stops, test below); the model is given back with its
    attention kernel and weights as they were."""
    model, tokenizer, _, _, rows = stories
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attention = model.get_base_model().config._attn_implementation
    instructions, contexts = [r["instruction"] for r in rows[:12]], [r["context"] for r in rows[:12]]
    with model.disable_adapter() if adapters == "off" else contextlib.nullcontext():
        static = generate(model, tokenizer, instructions, contexts, max_new_tokens=40, batch_size=8,
                          batching="static", progress=False)
        continuous = generate(model, tokenizer, instructions, contexts, max_new_tokens=40, progress=False)
    assert continuous == static and all(g["text"] for g in static)  # texts, ended and token counts
    assert model.get_base_model().config._attn_implementation == attention
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("caller_froze", [False, True])
def test_continuous_batching_collects_garbage_without_walking_the_callers_heap(stories, monkeypatch, caller_froze):
    """transformers' `generate_batch` runs full garbage collections on its way out; they must find the caller's
    objects frozen (a full walk of an evaluation process's heap cost 0.8 s per call), and the heap is given back
    as it was: unfrozen, or still frozen where the caller had frozen it."""
    model, tokenizer, _, _, rows = stories
    frozen_at_collections = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: frozen_at_collections.append(gc.get_freeze_count()) or collect(*a))
    if caller_froze:
        gc.freeze()
    try:
        generate(model, tokenizer, rows[0]["instruction"], max_new_tokens=4, progress=False)
        assert bool(gc.get_freeze_count()) == caller_froze
    finally:
        gc.unfreeze()
    assert frozen_at_collections and all(count > 0 for count in frozen_at_collections)


def test_bf16_bases_are_not_merged(stories_dir):
    model = wrap_lora(load_model(stories_dir, dtype=torch.bfloat16), r=4, alpha=8, dropout=0.0)
    assert not can_merge_lora(model)  # W + BA rounded to bf16 would be another model


def test_comparison_and_timings_show_eos_logprob_and_stages(tmp_path):
    from tinyllama_ft import plots, tables

    metrics = {"eval_loss": 1.0, "base_eval_loss": 2.0, "eos_logprob": -3.5, "base_eos_logprob": -25.4,
               "per_category": {"base": {"qa": {"eos_logprob": -20.0}}, "tuned": {"qa": {"eos_logprob": -2.0}}},
               "timings": {"prepare_data": 1.0, "train": 6.0, "save": 0.5, "total": 8.0}}
    rows = tables.comparison_rows(metrics)
    assert rows[0][("eos_logprob", "base")] == -25.4 and rows[0][("eos_logprob", "tuned")] == -3.5
    assert rows[1]["scope"] == "qa" and rows[1][("eos_logprob", "tuned")] == -2.0
    table = str(tables.format_comparison_table(metrics)).splitlines()
    assert table[0].split()[-6:] == ["EOS", "log-prob", "base", "EOS", "log-prob", "tuned"]
    assert table[2].split()[-2:] == ["-25.400", "-3.500"]
    plots.plot_comparison(metrics, save_to=tmp_path / "comparison.png")
    timings = str(tables.format_timings(metrics["timings"], save_to=tmp_path / "timings.md")).splitlines()
    assert [line.split()[0] for line in timings[2:5]] == ["prepare_data", "train", "save"]
    assert timings[3].split()[1:] == ["6.0", "75%"] and timings[-2].split()[-1] == "0.5"  # 8 - 7.5 outside
    plots.plot_timings(metrics["timings"], save_to=tmp_path / "timings.png")
    assert all((tmp_path / n).stat().st_size > 0 for n in ("comparison.png", "timings.png", "timings.md"))


def test_timings_add_up_stage_by_stage():
    timings = Timings()
    with timings("a"):
        sum(range(1000))
    with timings("b"):
        pass
    with timings("a"):  # entered again: adds up
        pass
    result = timings.as_dict()
    assert list(result) == ["a", "b", "total"]
    assert all(v >= 0 for v in result.values()) and result["total"] >= result["a"] + result["b"]
    with pytest.raises(ValueError), timings("c"):  # a stage that fails is still timed
        raise ValueError
    assert "c" in timings.as_dict()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident set's peak restarts on Linux only")
def test_the_resident_peak_restarts_where_asked():
    """The CPU high-water mark `benchmarks/memory_stages.py` reads per stage: 64 MiB touched and unmapped shows in
    the peak since the reset before it, and not after the next reset. (A fresh anonymous mapping, not a tensor:
    malloc may serve a tensor from heap pages that earlier tests left resident, which raise no peak.)"""
    assert reset_peak_memory(cpu=True)
    before = peak_memory(cpu=True)
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):  # every page made resident
        block[offset] = 1
    block.close()
    during = peak_memory(cpu=True)
    reset_peak_memory(cpu=True)
    assert during - before >= 60 * 2**20 and during - peak_memory(cpu=True) >= 60 * 2**20


@pytest.mark.slow
def test_train_records_timings_that_add_up(tmp_path):
    """The smoke run through `train`: metrics.json holds every stage; the stages and what runs between
    them (logging, seeding) make the total, which is the call's wall time. The slack covers the few
    statements outside the stages (measured: under 0.1 s), loose enough for a loaded machine."""
    out = tmp_path / "run"
    start = time.perf_counter()
    metrics = train(parse_config(["--preset", "smoke", "--output_dir", str(out)]))
    wall = time.perf_counter() - start
    timings = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["timings"]
    assert timings == pytest.approx(metrics["timings"])
    stages = ["prepare_data", "load_model", "evaluate_base", "train", "evaluate_tuned", "save"]
    assert list(timings) == stages + ["total"]
    assert all(timings[s] > 0 for s in stages)
    assert sum(timings[s] for s in stages) <= timings["total"] <= wall
    assert timings["total"] - sum(timings[s] for s in stages) < max(1.0, 0.05 * wall)
    assert wall - timings["total"] < max(1.0, 0.05 * wall)
    assert metrics["eos_logprob"] < 0 and metrics["base_eos_logprob"] < 0
    assert all("eos_logprob" in c for c in metrics["per_category"]["tuned"].values())
    recorded = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert ("peak_memory_bytes_by_stage" in recorded) == torch.cuda.is_available()  # CPU runs leave the peak alone


@pytest.mark.slow  # two evaluation paths on the bench model (random Llama, vocabulary 32,000): ~1 minute
def test_eval_paths_compares_the_paths_on_the_same_numbers(tmp_path):
    from benchmarks.eval_paths import main
    from tinyllama_ft.bench.compare import assets_dir

    if not (assets_dir() / "tinyllama-tokenizer").is_dir():
        pytest.skip(f"the real TinyLlama tokenizer is not under {assets_dir()} (set TINYLLAMA_ASSETS)")
    out = tmp_path / "bench.json"
    report = main(["--preset", "cpu", "--rows", "5", "--max_new_tokens", "4", "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8"))["speedup"] == pytest.approx(report["speedup"])
    assert report["validation_rows"] == 5 and report["generated_rows"] == 2 and report["texts"] == 4
    assert report["max_relative_difference"] <= 1e-5  # labelled-only vs full logits
    assert report["identical_texts"] == 4  # continuous batching, LoRA merged vs static batches of 8, unmerged
    assert report["identical_answer_lengths"] == 4  # the forced stopping pattern ends both paths' answers alike
    assert all(1 <= n <= 4 for n in report["stopping"]["answer_tokens"])
    for path in ("before", "today"):
        assert report[path]["tuned"]["loss"] != report[path]["base"]["loss"]  # the adapters matter


def test_eval_paths_rejects_a_budget_of_zero():
    from benchmarks.eval_paths import main
    from tinyllama_ft.errors import UserError

    with pytest.raises(UserError, match="--max_new_tokens must be >= 1"):
        main(["--preset", "cpu", "--max_new_tokens", "0"])
