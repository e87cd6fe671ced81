"""The model learns to stop: on the real pretrained stories260k and real Dolly rows, the same 60
optimizer steps through the project's stage functions, once with this project's labels (response +
EOS) and once with the seed's collator (`DataCollatorForLanguageModeling(tokenizer, mlm=False)`,
which labels every token and then masks every pad id: TinyLlama's pad is its EOS, so no EOS is ever
trained). `eos_logprob` (the mean log-probability of the EOS that closes each validation response,
teacher-forced) is measured before and after on the same validation rows, with this project's labels,
for both. With ours it must rise by at least 2 nats and by more than with the seed's collator.

A 260K model never reaches its EOS in greedy decoding (EOS rate 0 before and after), so this
teacher-forced measure is what shows the effect; docs/EVALUATION.md has the numbers and the command.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from tinyllama_ft import build_trainer, evaluate_base, evaluate_model, fit, load_tokenizer, parse_config, prepare_data
from tinyllama_ft import setup_model

pytestmark = pytest.mark.slow

STEPS = 60


class SeedCollator:
    """The seed's labels: `DataCollatorForLanguageModeling(mlm=False)` on the input ids alone (our
    labels dropped): labels = input ids, with every pad id (= the EOS) set to -100."""

    def __init__(self, tokenizer):
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def __call__(self, examples):
        return self.collator([{"input_ids": e["input_ids"]} for e in examples])


def run(stories_dir: str, dolly_path: str, out, seed_labels: bool) -> dict:
    """`STEPS` steps through parse_config -> prepare_data -> setup_model -> build_trainer -> fit, evaluated
    before and after by evaluate_base / evaluate_model. The seed's variant differs only in its collator
    (and so in padded rather than padding-free batches, which that collator needs)."""
    config = parse_config(
        [], model_name_or_path=stories_dir, dataset_name=dolly_path, output_dir=str(out), max_length=256,
        train_size=240, eval_size=64, test_size=0, num_generate=0, max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=5e-3, lora_r=8, lora_alpha=16, gradient_checkpointing=False,
        precision="fp32", use_cpu=True, eval_strategy="no", save_strategy="no", logging_steps=1000,
        report_to="none", disable_tqdm=True, padding_free=not seed_labels)
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    model = setup_model(config, tokenizer)
    trainer = build_trainer(config, model, tokenizer, data)
    if seed_labels:
        trainer.data_collator = SeedCollator(tokenizer)
    before = evaluate_base(config, model, tokenizer, data)
    train_metrics = fit(trainer)
    after = evaluate_model(config, model, tokenizer, data)
    return {"before": before["eos_logprob"], "after": after["eos_logprob"], "steps": train_metrics["train_steps"],
            "validation": data.examples("validation"), "loss_before": before["eval_loss"],
            "loss_after": after["eval_loss"]}


@pytest.fixture(scope="module")
def runs(stories_dir, dolly_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eos")
    return {name: run(stories_dir, dolly_path, tmp / name, seed_labels=name == "seed") for name in ("ours", "seed")}


def test_the_seed_collator_masks_every_eos(stories_dir, dolly_rows):
    from tinyllama_ft import encode_example, to_example

    tokenizer = load_tokenizer(stories_dir)
    examples = [encode_example(tokenizer, to_example(r)) for r in dolly_rows[:4]]
    ours = [e["labels"] for e in examples]
    assert all(labels[-1] == tokenizer.eos_token_id for labels in ours)  # our labels end with the EOS
    batch = SeedCollator(tokenizer)(examples)
    eos = batch["input_ids"] == tokenizer.eos_token_id
    assert eos.sum() >= 2 * len(examples)  # each row holds two EOS (end of user turn, end of response)
    assert (batch["labels"][eos] == -100).all()  # and the seed trains neither
    assert (batch["labels"][~eos & (batch["attention_mask"] == 1)] != -100).all()  # but the whole prompt


def test_our_labels_teach_the_eos_and_the_seeds_do_not(runs):
    ours, seed = runs["ours"], runs["seed"]
    rise_ours, rise_seed = ours["after"] - ours["before"], seed["after"] - seed["before"]
    print(f"\neos_logprob over {STEPS} steps on stories260k, same 64 validation rows: ours {ours['before']:.2f} -> "
          f"{ours['after']:.2f} ({rise_ours:+.2f} nats); seed collator {seed['before']:.2f} -> {seed['after']:.2f} "
          f"({rise_seed:+.2f} nats); response loss ours {ours['loss_before']:.3f} -> {ours['loss_after']:.3f}, "
          f"seed {seed['loss_before']:.3f} -> {seed['loss_after']:.3f}")
    assert ours["steps"] == seed["steps"] == STEPS
    assert ours["validation"] == seed["validation"]  # the very same evaluation rows and labels
    assert ours["before"] == pytest.approx(seed["before"], rel=1e-6)  # the same base (LoRA B starts at 0)
    assert rise_ours >= 2.0
    assert rise_ours > rise_seed
    assert torch.isfinite(torch.tensor([ours["after"], seed["after"]])).all()
