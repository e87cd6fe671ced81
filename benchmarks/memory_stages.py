"""Peak memory of each stage of `train` at TinyLlama's shape, against what `gradient_checkpointing auto` planned.

    TINYLLAMA_ASSETS=../shared/assets python -m benchmarks.memory_stages [--rows 32] [--max_steps 2] [--layers 22]
                                                                        [--out F.json]

Builds TinyLlama-1.1B with random weights in a process of its own (its real architecture config, saved in bf16 as
the hub's checkpoint is, with the real tokenizer), writes the `--rows` longest real Dolly rows that fit
`max_length` (1,024), so that every micro-batch is close to the worst case the planner measures, and runs the
stages of `train` (`training.sft.STAGES`, as `train` runs them) with the defaults (batch 2 x 8, padding-free,
checkpointing "auto") for `--max_steps` optimizer steps, in fp32 on this machine's device (the CPU without CUDA).
Each stage's peak is its own: on CUDA what PyTorch reserved, on the CPU the resident set (Linux only: its
high-water mark is restarted before each stage, `storage.timings.reset_peak_memory(cpu=True)`). Prints the stages'
peaks and the planner's prediction for the training stage (`predicted_peak_bytes` of `settings.memory.decide_checkpointing`) against the
measured peak, and whether every stage stayed within it. `--layers N` keeps TinyLlama's widths with N layers
(tests/test_memory.py runs 4, in seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

GIB = 2 ** 30


def build_model(assets: Path, folder: Path, layers: int | None = None) -> int:
    """TinyLlama's architecture (with `layers` layers) with random weights, in bf16, with the real tokenizer;
    returns its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(assets / "tinyllama-1.1b-config")
    config.num_hidden_layers = layers or config.num_hidden_layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets / "tinyllama-tokenizer").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_longest_rows(assets: Path, folder: Path, rows: int, max_length: int, out: Path) -> list[int]:
    """The `rows` longest Dolly rows whose encoding fits `max_length`, as JSONL (UTF-8); returns their lengths."""
    from tinyllama_ft.data.encoding import encode_example
    from tinyllama_ft.data.formats import load_rows, to_conversation
    from tinyllama_ft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    source = load_rows(str(assets / "dolly" / "dolly-sample-1109.jsonl"))
    lengths = [len(encode_example(tokenizer, to_conversation(row))["input_ids"]) for row in source]
    chosen = sorted((i for i, n in enumerate(lengths) if n <= max_length), key=lambda i: -lengths[i])[:rows]
    with open(out, "w", encoding="utf-8") as file:
        for i in chosen:
            file.write(json.dumps(source[i], ensure_ascii=False) + "\n")
    return [lengths[i] for i in chosen]


def run_stages(folder: Path, data: Path, out: Path, opts) -> dict:
    """The stages of `train` on this process, each stage's peak memory measured on its own; returns the run's
    metrics with `peak_memory_bytes_by_stage` (what `train` records on CUDA)."""
    import torch

    from tinyllama_ft.settings.config import parse_config
    from tinyllama_ft.settings.console import setup_console
    from tinyllama_ft.storage.run_folder import output_dir_held
    from tinyllama_ft.storage.timings import peak_memory, reset_peak_memory
    from tinyllama_ft.training.sft import STAGES, Run

    setup_console()
    cpu = not torch.cuda.is_available()
    config = parse_config(["--model_name_or_path", str(folder), "--dataset_name", str(data), "--output_dir", str(out),
                           "--train_size", str(opts.rows - 8), "--eval_size", "4", "--test_size", "4",
                           "--num_generate", "2", "--max_new_tokens", "16", "--max_steps", str(opts.max_steps),
                           "--precision", opts.precision, "--report_to", "none", "--save_strategy", "no",
                           "--eval_strategy", "no", "--disable_tqdm", "true", "--tokenization_cache", "false",
                           "--use_cpu", str(cpu).lower()])
    run, peaks = Run(config), {}
    with output_dir_held(config, "train"):
        for stage in STAGES:
            reset_peak_memory(cpu)
            getattr(run, stage)()
            peaks[stage] = peak_memory(cpu)
    return run.metrics | {"peak_memory_bytes_by_stage": peaks}


def report(metrics: dict, lengths: list[int], parameters: int) -> dict:
    decision = metrics["gradient_checkpointing_decision"]
    peaks = metrics["peak_memory_bytes_by_stage"]
    predicted = decision["predicted_peak_bytes"]
    highest = max(peaks, key=peaks.get)
    result = {"parameters": parameters, "row_lengths": lengths, "decision": decision, "peaks": peaks,
              "timings": metrics["timings"], "predicted_train_peak_bytes": predicted,
              "measured_train_peak_bytes": peaks["train"], "ratio": peaks["train"] / predicted,
              "highest_stage": highest, "every_stage_within_prediction": peaks[highest] <= predicted}
    print(f"parameters {parameters:,}; rows {len(lengths)} of {min(lengths)}-{max(lengths)} tokens")
    print(f"planner: checkpointing {'on' if decision['on'] else 'off'}; worst micro-batch {decision['tokens']} tokens "
          f"keeps {decision['activation_bytes'] / GIB:.2f} GiB for backward; resident then "
          f"{decision['resident_bytes'] / GIB:.2f} GiB; free {decision['free_bytes'] / GIB:.2f} GiB")
    print(f"{'stage':<16}{'seconds':>9}{'peak GiB':>10}")
    for stage, peak in peaks.items():
        print(f"{stage:<16}{metrics['timings'].get(stage, 0):>9.1f}{peak / GIB:>10.2f}")
    print(f"training stage: predicted {predicted / GIB:.2f} GiB, measured {peaks['train'] / GIB:.2f} GiB, "
          f"measured/predicted {result['ratio']:.3f}")
    print(f"highest stage: {highest} ({peaks[highest] / GIB:.2f} GiB); every stage within the prediction: "
          f"{'yes' if result['every_stage_within_prediction'] else 'NO'}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="longest Dolly rows: 8 held out, the rest trained on")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--layers", type=int, help="TinyLlama's widths with this many layers (default: its 22)")
    parser.add_argument("--out", help="write the numbers to this JSON file (UTF-8)")
    opts = parser.parse_args(argv)
    assets = Path(os.environ.get("TINYLLAMA_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    if not (assets / "tinyllama-1.1b-config").is_dir():
        sys.exit(f"no assets at \"{assets}\": set TINYLLAMA_ASSETS to the folder of tinyllama-1.1b-config")
    with tempfile.TemporaryDirectory(prefix="tinyllama-ft-memory-") as tmp:
        folder, data = Path(tmp) / "model", Path(tmp) / "longest.jsonl"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # its memory its own
            parameters = pool.submit(build_model, assets, folder, opts.layers).result()
        lengths = write_longest_rows(assets, folder, opts.rows, opts.max_length, data)
        result = report(run_stages(folder, data, Path(tmp) / "run", opts), lengths, parameters)
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
