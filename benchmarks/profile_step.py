"""A `torch.profiler` table of the default training step on the cpu bench model, for docs/PERFORMANCE.md.

    python -m benchmarks.profile_step [--micro_batches 16] [--rows 128] [--top 15]

Builds `bench --preset cpu`'s model (a random Llama, hidden 256, 4 layers, vocabulary 32,000, on the real TinyLlama
tokenizer), trains it through the project's path with the defaults (gradient checkpointing "auto": off here) on the
real Dolly rows, runs two untimed micro-batches, then profiles `--micro_batches` more (forward, backward and the
optimizer step every 8) and prints the operators by their own CPU time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tinyllama_ft.bench.compare import BENCH_PRESETS, bench_dataset
from tinyllama_ft.bench.worker import _prepare
from tinyllama_ft.settings.config import parse_config
from tinyllama_ft.data.prepare import prepare_data
from tinyllama_ft.model.loading import load_tokenizer
from tinyllama_ft.training.sft import build_trainer, setup_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro_batches", type=int, default=16)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--top", type=int, default=15)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        preset = BENCH_PRESETS["cpu"]
        _prepare(dict(preset="cpu", folder=f"{tmp}/model", model=preset["model"], device="cpu"))
        config = parse_config([], model_name_or_path=f"{tmp}/model", dataset_name=bench_dataset(),
                              output_dir=f"{tmp}/run", train_size=opts.rows, eval_size=0, test_size=0, num_generate=0,
                              eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True)
        tokenizer = load_tokenizer(config.model_name_or_path)
        data = prepare_data(config, tokenizer)
        model = setup_model(config, tokenizer)
        trainer = build_trainer(config, model, tokenizer, data)
        trainer.create_optimizer_and_scheduler(num_training_steps=100)
        batches = iter(trainer.get_train_dataloader())
        model.train()

        def step(i):
            batch = next(batches)
            trainer.training_step(model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()))
            if (i + 1) % config.gradient_accumulation_steps == 0:
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()

        for i in range(2):
            step(i)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(opts.micro_batches):
                step(i)
    print(f"gradient_checkpointing: {config.gradient_checkpointing}; {opts.micro_batches} micro-batches; "
          f"threads {torch.get_num_threads()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.top))


if __name__ == "__main__":
    main()
