"""The proposed fast path (padding-free batches) learns exactly what the seed's padded batches learn.

On the real pretrained stories260k model and real Dolly rows, through the project's own path
(`parse_config` -> `prepare_data` -> `setup_model` -> `build_trainer`, TRL's collators and its
fused-LM-head loss), in fp32:

* every row's loss (sum of the NLL over its labelled tokens) is the same in a padded batch and in a
  padding-free batch, and so are the LoRA gradients of a micro-batch;
* in a padding-free batch a row never attends to another: its loss does not move when its neighbour
  changes, while the same concatenation *without* per-row position ids (what a leak looks like) does;
* the seed's and the proposed configuration feed the same rows, in the same micro-batches, to the
  same optimizer steps;
* projecting only the labelled positions through the LM head (the default) gives the loss and LoRA
  gradients of projecting every position (the seed).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from tinyllama_ft.bench.compare import SEED, assets_dir
from tinyllama_ft.training.lm_head import LogSoftmaxLogProbs

ASSETS = assets_dir()
STORIES = ASSETS / "stories260k"
DOLLY = ASSETS / "dolly" / "dolly-sample-1109.jsonl"

pytestmark = pytest.mark.skipif(
    not (STORIES.is_dir() and DOLLY.is_file()),
    reason=f"offline assets (stories260k, Dolly sample) not found under {ASSETS}: set TINYLLAMA_ASSETS",
)

ROWS = 48
# Per-row NLL sums here are ~100-2,500 nats; padded vs padding-free differ by fp32 summation order only
# (observed: relative 1e-7, absolute 2.4e-4), so rtol=1e-5 is tight yet never flaky.
ATOL = 1e-4


def _build(overrides: dict, tmp_path):
    from tinyllama_ft.settings.config import parse_config
    from tinyllama_ft.model.loading import load_tokenizer
    from tinyllama_ft.data.prepare import prepare_data
    from tinyllama_ft.training.sft import build_trainer, setup_model

    config = parse_config(
        [], model_name_or_path=str(STORIES), dataset_name=str(DOLLY), output_dir=str(tmp_path / "run"),
        train_size=ROWS, eval_size=0, test_size=0, num_generate=0, max_length=512,  # stories260k's context
        lora_dropout=0.0, precision="fp32", use_cpu=True, report_to="none", save_strategy="no",
        **overrides)
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    model = setup_model(config, tokenizer)
    # LoRA's B starts at zero; give the adapters real weights (the same in every model) so they matter.
    generator = torch.Generator().manual_seed(0)
    for name, parameter in sorted(model.named_parameters()):
        if "lora_B" in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    trainer = build_trainer(config, model, tokenizer, data)
    model.train()
    return trainer, data


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    seed, data = _build(dict(SEED), tmp / "seed")
    fast, _ = _build({}, tmp / "fast")
    return seed, fast, data


def _examples(data, n: int):
    rows = data.examples("train")[:n]
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def _row_nll(trainer, batch) -> list[torch.Tensor]:
    """Per-row sums of the NLL over labelled tokens, from the trainer's own fused LM head (what its loss sums)."""
    inputs = {k: v for k, v in batch.items()}
    outputs = trainer.model(**inputs, use_cache=False, fused_lm_head=True)
    nll = -outputs.log_probs  # (batch, length - 1): token t+1 given tokens <= t; zero where unlabelled
    if "cu_seq_lens_q" in batch:  # one concatenated sequence: split it at the row boundaries
        bounds = batch["cu_seq_lens_q"].tolist()
        return [nll[0, start:end - 1].sum() for start, end in zip(bounds[:-1], bounds[1:])]
    return [row.sum() for row in nll]


def test_the_configurations_differ_as_claimed(trainers):
    seed, fast, _ = trainers
    assert not seed.padding_free and fast.padding_free
    assert seed.args.optim == "adamw_torch" and fast.args.optim == "adamw_torch_fused"
    assert not seed.args.lm_head_labelled_only and fast.args.lm_head_labelled_only
    assert seed.args.gradient_checkpointing is True  # the seed's
    assert fast.args.gradient_checkpointing in (True, False)  # the default's "auto", decided by build_trainer
    assert fast.model.config.use_cache is False  # the trainer turns the cache off (see test_cache_on_leaks)


def test_per_row_losses_equal_padded_vs_padding_free(trainers):
    seed, fast, data = trainers
    examples = _examples(data, 12)
    lengths = [len(e["input_ids"]) for e in examples]
    assert max(lengths) > 2 * min(lengths), "the rows should differ in length so that padding happens"
    with torch.no_grad():
        for i in range(0, len(examples), 2):  # the seed's micro-batches of 2 rows
            pair = examples[i:i + 2]
            padded = seed.data_collator(pair)
            flat = fast.data_collator(pair)
            assert "attention_mask" in padded and padded["input_ids"].shape == (2, max(lengths[i:i + 2]))
            assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(lengths[i:i + 2]))
            expected, got = _row_nll(seed, padded), _row_nll(fast, flat)
            assert len(got) == len(expected) == len(pair)
            for a, b in zip(expected, got):
                assert float(a) > 1.0
                assert torch.allclose(a, b, rtol=1e-5, atol=ATOL), (float(a), float(b))
    # ... and all 12 rows in one padding-free micro-batch give the same per-row losses again
    with torch.no_grad():
        big = _row_nll(fast, fast.data_collator(examples))
        each = [_row_nll(seed, seed.data_collator([e]))[0] for e in examples]
    assert torch.allclose(torch.stack(big), torch.stack(each), rtol=1e-5, atol=ATOL)


def test_micro_batch_loss_and_lora_gradients_equal(trainers):
    """The trainer's own `compute_loss` on the same 2 rows: same loss, same LoRA gradients."""
    seed, fast, data = trainers
    pair = _examples(data, 4)[2:4]

    def loss_and_grads(trainer, batch):
        trainer.model.zero_grad()
        items = (batch["labels"][..., 1:] != -100).sum()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.model.zero_grad()
        return loss.detach(), grads

    loss_a, grads_a = loss_and_grads(seed, seed.data_collator(pair))
    loss_b, grads_b = loss_and_grads(fast, fast.data_collator(pair))
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-6), (float(loss_a), float(loss_b))
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:  # fp32: equal up to summation order, relative to the gradient's size
        difference = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm().clamp(min=1e-12)
        assert difference < 1e-4, (name, float(difference))
    assert all(g.norm() > 0 for n, g in grads_a.items() if "lora_A" in n or "lora_B" in n)


@pytest.mark.parametrize("implementation", ["auto", "trl"])
def test_lm_head_over_labelled_positions_only_gives_the_same_loss_and_gradients(trainers, monkeypatch, implementation):
    """`lm_head_labelled_only`: the LM head sees only the positions whose next token is trained, on CPU
    too (TRL itself does so only on CUDA/XPU), and the loss and LoRA gradients stay those of scoring every
    position; with either way of scoring them (`lm_head_implementation`)."""
    import trl.trainer.utils as trl_utils

    _, fast, data = trainers
    batch = fast.data_collator(_examples(data, 4)[2:4])
    items = (batch["labels"][..., 1:] != -100).sum()
    positions = batch["input_ids"].shape[1] - 1
    assert 0 < int(items) < positions
    decide, kernel = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    scorer = LogSoftmaxLogProbs if implementation == "auto" else kernel  # on CPU: no Triton
    apply, scored = scorer.apply, []
    monkeypatch.setattr(scorer, "apply", lambda hidden, *rest: (scored.append(hidden.shape[0]), apply(hidden, *rest))[1])
    monkeypatch.setattr(fast.args, "lm_head_implementation", implementation)
    results = {}
    for labelled_only in (True, False):
        monkeypatch.setattr(fast.args, "lm_head_labelled_only", labelled_only)
        fast.model.zero_grad()
        loss = fast.compute_loss(fast.model, dict(batch), num_items_in_batch=items)
        loss.backward()
        assert trl_utils._use_triton is decide and trl_utils._ChunkedLogProbFunction is kernel  # TRL's own after
        results[labelled_only] = loss.detach(), {n: p.grad.detach().clone() for n, p in
                                                 fast.model.named_parameters() if p.requires_grad}
        fast.model.zero_grad()
    assert scored == [int(items), positions]
    (loss_a, grads_a), (loss_b, grads_b) = results[True], results[False]
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-6), (float(loss_a), float(loss_b))
    for name in grads_a:
        difference = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-12)
        assert difference < 1e-5, (name, float(difference))
    assert all(g.norm() > 0 for n, g in grads_a.items() if "lora_" in n)


def test_log_softmax_scoring_equals_trls_tiles_in_every_output_and_gradient():
    """`LogSoftmaxLogProbs` against TRL's own `ChunkedLogProbFunction` on the same inputs, with a temperature,
    a logit scale and a soft cap, tiles narrower than the vocabulary: the same five outputs and the same
    gradient of the hidden states (fp32: equal up to summation order)."""
    import trl.trainer.utils as trl_utils

    torch.manual_seed(0)
    hidden = torch.randn(37, 16)
    weight, bias = torch.randn(101, 16), torch.randn(101)
    targets = torch.randint(0, 101, (37,))
    targets[0] = int((hidden[0] @ weight.T + bias).argmax())  # one position whose target is the argmax
    every = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results = []
    for scorer in (trl_utils._ChunkedLogProbFunction, LogSoftmaxLogProbs):
        h = hidden.clone().requires_grad_()
        out = scorer.apply(h, weight, bias, targets, 0.7, 32, 30.0, 1.3, every)
        (grad,) = torch.autograd.grad(out[0].sum(), h)
        results.append((out, grad))
    (trl_out, trl_grad), (ours, our_grad) = results
    for name, a, b in zip(every, trl_out, ours):
        if name == "is_top1":
            assert torch.equal(a, b) and bool(b[0]), name
        else:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, float((a - b).abs().max()))
    assert torch.allclose(trl_grad, our_grad, rtol=1e-5, atol=1e-5)  # both hold their statistics in fp32


def test_a_trl_without_the_switch_is_reported(tmp_path, monkeypatch, caplog):
    """Should TRL drop `trl.trainer.utils._use_triton`, the trainer says that `lm_head_labelled_only` no longer
    acts (the loss stays TRL's), rather than saying nothing."""
    import logging

    import trl.trainer.utils as trl_utils

    monkeypatch.delattr(trl_utils, "_use_triton")
    with caplog.at_level(logging.WARNING, logger="tinyllama_ft.training.sft"):
        _build({}, tmp_path)
    assert "lm_head_labelled_only=True and lm_head_implementation=auto have no effect" in caplog.text


def test_rows_never_attend_to_each_other_in_a_padding_free_batch(trainers):
    _, fast, data = trainers
    examples = _examples(data, 8)
    row, neighbours = examples[0], examples[1:]
    with torch.no_grad():
        alone = _row_nll(fast, fast.data_collator([row]))[0]
        for neighbour in neighbours:  # the row after a different neighbour each time, and before it
            after = _row_nll(fast, fast.data_collator([neighbour, row]))[1]
            before = _row_nll(fast, fast.data_collator([row, neighbour]))[0]
            assert torch.allclose(after, alone, rtol=1e-5, atol=ATOL), (float(after), float(alone))
            assert torch.allclose(before, alone, rtol=1e-5, atol=ATOL)


def test_a_leak_would_be_detected(trainers):
    """Control: the same concatenation with positions running on (no per-row restart) lets the second row
    see the first, and its loss moves; so the equality above is not vacuous."""
    _, fast, data = trainers
    row, neighbour = _examples(data, 2)
    with torch.no_grad():
        alone = _row_nll(fast, fast.data_collator([row]))[0]
        batch = fast.data_collator([neighbour, row])
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
        del leaky["cu_seq_lens_q"], leaky["cu_seq_lens_k"], leaky["max_length_q"], leaky["max_length_k"]
        start = len(neighbour["input_ids"])
        nll = -fast.model(**leaky, use_cache=False, fused_lm_head=True).log_probs
        assert not torch.allclose(nll[0, start:-1].sum(), alone, atol=1e-2)


def test_cache_on_leaks_so_the_trainer_must_keep_it_off(trainers):
    """Pitfall guard: transformers builds the per-row (block-diagonal) SDPA mask from position ids only when no
    KV cache is passed; with `use_cache=True` a padding-free batch attends across rows. SFTTrainer forces
    `use_cache=False` in `compute_loss`; anyone evaluating padding-free batches by hand must do the same."""
    _, fast, data = trainers
    row, neighbour = _examples(data, 2)
    model = fast.model.get_base_model()
    batch = fast.data_collator([neighbour, row])
    start = len(neighbour["input_ids"])
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
        off = model(**inputs, use_cache=False).logits[0, start:]
        on = model(**inputs, use_cache=True).logits[0, start:]
    assert torch.allclose(off, alone, atol=1e-4)
    assert not torch.allclose(on, alone, atol=1e-2)


def _digest(batches) -> list[str]:
    return [hashlib.sha1(repr([len(ids) for ids in b]).encode() + repr(b).encode()).hexdigest() for b in batches]


def test_same_rows_in_the_same_micro_batches(trainers):
    """Both configurations draw the same random order (same seed, same sampler) and cut it into the same
    micro-batches of 2 rows, so every optimizer step sums the loss over the same rows."""
    from transformers import set_seed

    seed, fast, _ = trainers
    seen = {}
    for name, trainer in (("seed", seed), ("fast", fast)):
        set_seed(trainer.args.seed)
        batches = []
        for batch in trainer.get_train_dataloader():
            ids, labels = batch["input_ids"], batch["labels"]
            if "cu_seq_lens_q" in batch:
                bounds = batch["cu_seq_lens_q"].tolist()
                batches.append([ids[0, s:e].tolist() for s, e in zip(bounds[:-1], bounds[1:])])
            else:
                mask = batch["attention_mask"].bool()
                batches.append([ids[i][mask[i]].tolist() for i in range(ids.shape[0])])
        seen[name] = batches
    assert len(seen["seed"]) == ROWS // 2
    assert _digest(seen["seed"]) == _digest(seen["fast"])


def test_training_through_fit_learns_the_same_adapters(tmp_path):
    """End to end: `fit` for 3 optimizer steps (48 rows, 2 x 8) under the seed's configuration and under the
    proposed one ends with the same LoRA weights and the same training loss (fp32; LoRA dropout off so that
    both runs draw no random masks, whose shapes differ between padded and padding-free batches)."""
    from tinyllama_ft.training.sft import fit

    common = dict(learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1)
    runs, runs_initial = {}, {}
    for name, overrides in (("seed", SEED), ("fast", {})):
        trainer, _ = _build(dict(overrides, **common), tmp_path / name)
        runs_initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        metrics = fit(trainer)
        assert metrics["train_steps"] == ROWS // 16
        adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        runs[name] = metrics["train_loss"], adapters
    (loss_a, weights_a), (loss_b, weights_b) = runs["seed"], runs["fast"]
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert weights_a.keys() == weights_b.keys()
    # Adam moves a weight by up to ~lr = 2e-3 a step, and where a gradient is near zero its update
    # g / (|g| + eps) amplifies fp32 summation-order noise. Observed: the two runs' adapters differ by 3.6e-5 of
    # how far training moved them (largest single weight 2.9e-5, vs 6e-3 moved); allowed: 1e-3 and 1e-4.
    change = torch.cat([(weights_a[n] - runs_initial[n]).flatten() for n in sorted(weights_a)])
    gap = torch.cat([(weights_a[n] - weights_b[n]).flatten() for n in sorted(weights_a)])
    assert change.abs().max() > 1e-3  # training did move the adapters
    assert gap.abs().max() < 1e-4, float(gap.abs().max())
    assert gap.norm() / change.norm() < 1e-3, float(gap.norm() / change.norm())
