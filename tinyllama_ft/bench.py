"""`python -m tinyllama_ft bench --preset cpu|gpu [--out F.json]`: the seed's training configuration
against the project's default, on the same model, the same rows and the same real tokens.

Each configuration trains through the project's own path (`parse_config` with overrides ->
`prepare_data` -> `setup_model` -> `build_trainer` -> `fit`) in a subprocess of its own, so that peak
memory (peak RSS on CPU, `torch.cuda.max_memory_reserved` on CUDA) belongs to that configuration
alone. Reported per configuration: real (non-padding) tokens per second, the share of computed tokens
that are padding, peak memory and seconds per optimizer step; and `speedup`, the default's real
tokens/s over the seed's.

Presets:

* ``cpu``: a small random Llama (hidden 256, 4 layers, vocabulary 32,000) on the real TinyLlama
  tokenizer, so that sequence lengths are real; a few minutes on 2 cores.
* ``gpu``: TinyLlama-1.1B's exact shape with random weights (throughput does not depend on the
  weight values); also reports model FLOPs utilisation against the bf16 matmul peak of the card,
  measured in the same run. Needs one CUDA GPU.

Data: the 1,109-row Dolly sample from the offline assets (`TINYLLAMA_ASSETS`, default
``../shared/assets`` next to the repository) where present, else the sample bundled with the
package. The tokenizer (and, for ``gpu``, the architecture) come from the assets too, else from the
hub.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import UserError

TINYLLAMA_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The seed's training configuration, spelled out so that it stays the seed's when the project's
# defaults change: batches of 2 rows in random order, each padded to its longest row, 8 micro-batches
# per optimizer step, gradient checkpointing, plain (non-fused) AdamW, fp16 on CUDA (fp32 on CPU), and
# the LM head over every position (the seed's model built the full logits, prompt and padding included).
SEED = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=8,
    train_sampling_strategy="random",
    padding_free=False,
    packing=False,
    gradient_checkpointing=True,
    optim="adamw_torch",
    lm_head_labelled_only=False,
)

# The proposed default, as overrides of the current defaults (a no-op once config.py carries them).
# Padding-free batches of the same 2 random rows: the rows are concatenated into one sequence with
# position ids restarting at 0 per row, so nothing is padded and (with SDPA or FlashAttention) no row
# attends to another; the same rows make the same optimizer steps, so what is learned is unchanged.
# The LM head runs only at labelled positions (their loss and gradients are all there is). Gradient
# checkpointing decides itself ("auto", tinyllama_ft/memory.py): off where the worst-case micro-batch's
# activations take at most half of the free memory (so off on this CPU preset), on otherwise.
PROPOSED = dict(
    padding_free=True,
    optim="adamw_torch_fused",
    lm_head_labelled_only=True,
    gradient_checkpointing="auto",
)

# Other candidates measured for docs/PERFORMANCE.md (`--candidates [NAME ...]`); each is PROPOSED/SEED + overrides.
# (TRL 1.16's loss_type="chunked_nll" is a deprecated alias of "nll", the default the project already runs:
# trl/trainer/sft_config.py turns one into the other, so it is no candidate of its own.)
CANDIDATES = {
    "seed_no_checkpointing": dict(SEED, gradient_checkpointing=False),
    "seed_labelled_head": dict(SEED, lm_head_labelled_only=True),
    "default_all_positions": dict(PROPOSED, lm_head_labelled_only=False),
    "default_checkpointing": dict(PROPOSED, gradient_checkpointing=True),
    "default_compiled": dict(PROPOSED, torch_compile=True),
    "group_by_length": dict(SEED, gradient_checkpointing=False, optim="adamw_torch_fused",
                            lm_head_labelled_only=True, train_sampling_strategy="group_by_length"),
    "padding_free_4x4": dict(PROPOSED, per_device_train_batch_size=4, gradient_accumulation_steps=4),
    "padding_free_16x1": dict(PROPOSED, per_device_train_batch_size=16, gradient_accumulation_steps=1),
    "packing_bfd": dict(PROPOSED, packing=True, packing_strategy="bfd", per_device_train_batch_size=1,
                        gradient_accumulation_steps=4),
}

BENCH_PRESETS = {
    "cpu": dict(train_size=128, max_length=1024,
                model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2)),
    # 1,088 of the 1,097 sample rows that fit 1,024 tokens: 68 optimizer steps
    "gpu": dict(train_size=1088, max_length=1024, model=None),  # None: TinyLlama's own config
}

KEYS = ("real_tokens_per_second", "padding_share", "peak_memory_bytes", "seconds_per_step")
GIB = 1024 ** 3
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context and kernels: outside what PyTorch's allocator reserves


# --- where things are --------------------------------------------------------------------------

def assets_dir() -> Path:
    """The offline assets: `TINYLLAMA_ASSETS`, else ``../shared/assets`` from the repository root."""
    return Path(os.environ.get("TINYLLAMA_ASSETS") or REPO_ROOT.parent / "shared" / "assets")


def bench_dataset() -> str:
    """The real Dolly sample from the assets where present, else the package's bundled sample."""
    dolly = assets_dir() / "dolly" / "dolly-sample-1109.jsonl"
    return str(dolly) if dolly.is_file() else _bundled_sample()


def _bundled_sample() -> str:
    from .config import SAMPLE_DATA

    return SAMPLE_DATA


def _tokenizer_source() -> str:
    local = assets_dir() / "tinyllama-tokenizer"
    return str(local) if local.is_dir() else TINYLLAMA_ID


def _architecture_source() -> str:
    local = assets_dir() / "tinyllama-1.1b-config"
    return str(local) if (local / "config.json").is_file() else TINYLLAMA_ID


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the command line
        raise UserError(f"{self.prog}: {message}")


# --- the command -------------------------------------------------------------------------------

def main(args: list[str]) -> dict:
    parser = _Parser(prog="python -m tinyllama_ft bench",
                     description="Seed training configuration vs the project default.")
    parser.add_argument("--preset", required=True, choices=sorted(BENCH_PRESETS))
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--rows", type=int, help="training rows (one epoch; a multiple of 16 keeps every optimizer "
                        "step full). Default: 128 for cpu, 1088 for gpu")
    parser.add_argument("--candidates", nargs="*", metavar="NAME",
                        help="also measure the other candidate configurations (slower): all, or those named ("
                        + ", ".join(CANDIDATES) + ")")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every configuration N times, interleaved, and keep each one's fastest run "
                        "(for a shared or noisy machine)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per training process (default: PyTorch's, one per core)")
    parser.add_argument("--max_memory_gib", type=float,
                        help="gpu: cap every training process at this much GPU memory "
                        "(torch.cuda.set_per_process_memory_fraction), e.g. 12 for a 12 GB card")
    parser.add_argument("--eval", action="store_true",
                        help="time evaluation instead (base + fine-tuned: validation loss and greedy generation, answers "
                        "ending at a realistic forced stopping pattern), the code before issue 12 (full logits, "
                        "static batches of 8, LoRA unmerged) against today's, side by side")
    parser.add_argument("--max_new_tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                        help=f"with --eval: generation budget per answer (default {EVAL_MAX_NEW_TOKENS})")
    opts = parser.parse_args(args)
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"bench: --threads must be >= 1, got {opts.threads}")
    if opts.repeat < 1:
        raise UserError(f"bench: --repeat must be >= 1, got {opts.repeat}")
    preset = dict(BENCH_PRESETS[opts.preset])
    if opts.rows is not None:
        if opts.rows < 2:
            raise UserError(f"bench: --rows must be >= 2, got {opts.rows}")
        preset["train_size"] = opts.rows
    if opts.preset == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError("bench --preset gpu needs a CUDA GPU and none is visible: run --preset cpu here, "
                            "or run this on a GPU machine")
    unknown = sorted(set(opts.candidates or []) - set(CANDIDATES))
    if unknown:
        raise UserError(f"bench: unknown candidate {unknown[0]!r}: choose from {', '.join(CANDIDATES)}")
    if opts.max_memory_gib is not None and (opts.preset != "gpu" or opts.max_memory_gib <= 0):
        raise UserError("bench: --max_memory_gib needs --preset gpu and a positive number of GiB")
    if opts.out:
        out_dir = Path(opts.out).resolve().parent
        if not out_dir.is_dir():
            raise UserError(f"bench: folder {out_dir} of --out does not exist")

    if opts.eval:
        return main_eval(opts, preset)
    dataset = bench_dataset()
    if dataset == _bundled_sample() and opts.rows is None:  # 48 rows only
        preset["train_size"] = 32
        print(f"bench: the Dolly sample is not under {assets_dir()}; using the 48-row sample bundled with the "
              "package (32 training rows)", file=sys.stderr)
    device = "cuda" if opts.preset == "gpu" else "cpu"
    with tempfile.TemporaryDirectory(prefix="tinyllama-ft-bench-") as tmp:
        tmp = Path(tmp)
        prepared = _run_worker(tmp, "prepare", dict(preset=opts.preset, folder=str(tmp / "model"),
                                                    model=preset["model"], device=device))
        common = dict(model_name_or_path=prepared["folder"], dataset_name=dataset,
                      train_size=preset["train_size"], max_length=preset["max_length"])
        precision = {"cpu": "fp32", "gpu": "fp16"}[device]
        configs = {"baseline": dict(SEED, precision=precision), "default": dict(PROPOSED, precision="auto")}
        if opts.candidates is not None:  # those built on the seed keep the seed's precision
            configs |= {name: dict(c, precision=precision if c["optim"] == SEED["optim"] else "auto")
                        for name, c in CANDIDATES.items() if name in (opts.candidates or CANDIDATES)}
        results: dict[str, dict] = {}
        for attempt in range(opts.repeat):
            for name, overrides in configs.items():
                print(f"bench: training {name} ({_describe(overrides)})"
                      + (f", run {attempt + 1} of {opts.repeat}" if opts.repeat > 1 else "") + " ...",
                      file=sys.stderr, flush=True)
                result = _run_worker(tmp, "train", dict(name=name, device=device, tmp=str(tmp), threads=opts.threads,
                                                        max_memory_gib=opts.max_memory_gib,
                                                        overrides=common | overrides))
                result["runs"] = results.get(name, {}).get("runs", []) + [result["real_tokens_per_second"]]
                if name not in results or result["real_tokens_per_second"] > results[name]["real_tokens_per_second"]:
                    results[name] = result
                else:
                    results[name]["runs"] = result["runs"]
                if device == "cuda":
                    _add_mfu(results[name], prepared)
        for result in results.values():
            base = results["baseline"]
            result["same_micro_batches_as_baseline"] = result["micro_batch_digest"] == base["micro_batch_digest"]
            result["same_row_order_as_baseline"] = result["row_order_digest"] == base["row_order_digest"]

    report = {"preset": opts.preset, "device": prepared["device_name"], "model": prepared["model"],
              "dataset": common["dataset_name"], "rows": preset["train_size"],
              "max_memory_gib": opts.max_memory_gib,
              "baseline": results.pop("baseline"), "default": results.pop("default")}
    report["speedup"] = report["default"]["real_tokens_per_second"] / report["baseline"]["real_tokens_per_second"]
    if results:
        report["candidates"] = results
    if device == "cuda":
        report["bf16_matmul_peak_flops"] = prepared["bf16_matmul_peak_flops"]
    print(format_table(report))
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _describe(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def format_table(report: dict) -> str:
    rows = [("baseline (seed)", report["baseline"]), ("default", report["default"])]
    rows += list(report.get("candidates", {}).items())
    mfu = "mfu" in report["baseline"]
    head = (f"{'configuration':<22}{'real tok/s':>11}{'padding':>9}{'peak mem GiB':>13}{'worst GiB':>10}"
            f"{'s/step':>8}{'steps':>6}{'tok/cpu-s':>10}  rows vs seed")
    threads = "" if report["preset"] == "gpu" else f", {report['baseline']['threads']} threads"
    lines = [f"bench --preset {report['preset']} on {report['device']}{threads}: {report['rows']} rows of "
             f"{Path(report['dataset']).name}, model {report['model']}", head + ("    MFU" if mfu else "")]
    for name, r in rows:
        same = ("same batches" if r["same_micro_batches_as_baseline"] else
                "same order" if r["same_row_order_as_baseline"] else "reordered")
        line = (f"{name:<22}{r['real_tokens_per_second']:>11.1f}{r['padding_share']:>9.1%}"
                f"{r['peak_memory_bytes'] / GIB:>13.2f}{r['worst_case_peak_memory_bytes'] / GIB:>10.2f}"
                f"{r['seconds_per_step']:>8.2f}{r['steps']:>6}{r['real_tokens_per_cpu_second']:>10.1f}  {same:<12}")
        lines.append(line + (f"{r['mfu']:>7.1%}" if mfu else ""))
    lines.append(f"speedup (default / baseline, real tokens/s): {report['speedup']:.2f}x")
    base = report["baseline"]["train_loss"]
    lines.append("training loss: " + ", ".join(f"{name} {r['train_loss']:.6f}" for name, r in rows)
                 + f"; largest relative difference from the seed's: "
                 f"{max(abs(r['train_loss'] - base) / abs(base) for _, r in rows):.1e}")
    if report["preset"] == "gpu":
        lines.append("fits a 12 GB GPU (largest of peak and worst-case reserved, + 0.5 GiB CUDA context, <= 12 GiB): "
                     + ", ".join(f"{name} {'yes' if r['fits_12gb'] else 'NO'}" for name, r in rows))
    return "\n".join(lines)


# --- subprocesses ------------------------------------------------------------------------------

def _run_worker(tmp: Path, kind: str, spec: dict) -> dict:
    """Run `_worker` in a fresh Python process; its peak memory is its own."""
    name = spec.get("name", kind)
    spec_path, result_path, log_path = tmp / f"{name}.spec.json", tmp / f"{name}.result.json", tmp / f"{name}.log"
    spec_path.write_text(json.dumps(dict(spec, kind=kind, result=str(result_path))), encoding="utf-8")
    result_path.unlink(missing_ok=True)  # a run repeated must not read its previous result
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.run([sys.executable, "-m", "tinyllama_ft.bench", str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp))
    if process.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        sys.stderr.write("\n".join(tail) + "\n")
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        raise UserError(f"bench: the {name} run failed (exit {process.returncode}): {last.strip()}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise UserError(f"bench: the {name} run stopped: {result['error']}")
    return result


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    try:
        result = {"prepare": _prepare, "train": _train, "evaluate": _evaluate}[spec["kind"]](spec)
    except UserError as error:  # reported by the parent as one line
        result = {"error": str(error)}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


def _prepare(spec: dict) -> dict:
    """Write the benchmark model (random weights) with the real TinyLlama tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(_tokenizer_source())
    device = spec["device"]
    if spec["model"] is None:  # TinyLlama's exact architecture
        config = LlamaConfig.from_pretrained(_architecture_source())
        description = "TinyLlama-1.1B shape, random weights"
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **spec["model"])
        description = (f"random Llama hidden {config.hidden_size} x {config.num_hidden_layers} layers, "
                       f"vocab {config.vocab_size}")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    embedding = model.get_input_embeddings().weight.numel()
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(spec["folder"])
    tokenizer.save_pretrained(spec["folder"])
    result = {"folder": spec["folder"], "model": f"{description}, {parameters / 1e6:.1f}M parameters",
              "parameters": parameters, "matmul_parameters": parameters - embedding,
              "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
              "device_name": _device_name(device)}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
        result["bf16_matmul_peak_flops"] = bf16_matmul_peak()
    return result


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def bf16_matmul_peak(n: int = 8192, iterations: int = 20) -> float:
    """Achieved bf16 matmul FLOP/s of the current GPU: the best of three timed runs of n x n x n."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iterations):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * iterations / (time.perf_counter() - start))
    del a, b
    torch.cuda.empty_cache()
    return best


class CountingCollator:
    """Wraps the trainer's collator; counts real tokens (the rows' own) and computed tokens (the batch), and
    fingerprints the order of the rows and their grouping into micro-batches."""

    def __init__(self, collator):
        self.collator = collator
        self.real = self.computed = 0
        self.row_lengths: list[int] = []
        self._rows, self._batches = hashlib.sha1(), hashlib.sha1()

    def __call__(self, examples):
        batch = self.collator(examples)
        for example in examples:
            lengths = example.get("seq_lengths") or [len(example["input_ids"])]  # packed examples hold several
            self.row_lengths += list(lengths)
            self.real += sum(lengths)
            self._rows.update(repr(list(example["input_ids"])).encode())
        self._batches.update(repr([list(e["input_ids"]) for e in examples]).encode())
        self.computed += batch["input_ids"].numel()
        return batch

    @property
    def row_order_digest(self) -> str:
        return self._rows.hexdigest()

    @property
    def micro_batch_digest(self) -> str:
        return self._batches.hexdigest()


def _cpu_seconds() -> float:
    times = os.times()  # user + system CPU time of this process, on every OS
    return times.user + times.system


def _peak_rss_bytes() -> int:
    try:
        import resource  # Unix only: imported here so that the module imports on Windows
    except ImportError:
        import psutil  # Windows: the peak working set

        return psutil.Process().memory_info().peak_wset
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _train(spec: dict) -> dict:
    import torch
    from transformers import set_seed

    from .config import parse_config
    from .modeling import load_tokenizer
    from .train import build_trainer, fit, prepare_data, setup_model

    cuda = spec["device"] == "cuda"
    if cuda and spec.get("max_memory_gib"):  # before anything is allocated: the cap the whole run lives under
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["max_memory_gib"] * GIB / total))
    tmp = Path(spec["tmp"])
    overrides = dict(output_dir=str(tmp / "runs" / spec["name"]), eval_size=0, test_size=0, num_generate=0,
                     eval_strategy="no", save_strategy="no", logging_steps=10_000, report_to="none",
                     disable_tqdm=True, num_train_epochs=1, max_steps=-1, use_cpu=not cuda,
                     dataloader_num_workers=0) | spec["overrides"]  # 0: the counting collator runs here
    config = parse_config([], **overrides)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    model = setup_model(config, tokenizer)
    trainer = build_trainer(config, model, tokenizer, data)
    counter = trainer.data_collator = CountingCollator(trainer.data_collator)
    if cuda:
        torch.cuda.synchronize()
    cpu_start = _cpu_seconds()
    metrics = fit(trainer)
    cpu_seconds = _cpu_seconds() - cpu_start
    peak = metrics["peak_memory_reserved_bytes"] if cuda else _peak_rss_bytes()
    steps = max(metrics["train_steps"], 1)
    result = {
        "real_tokens_per_second": counter.real / metrics["train_runtime"],
        "padding_share": 1 - counter.real / max(counter.computed, 1),
        "peak_memory_bytes": int(peak),
        "seconds_per_step": metrics["train_runtime"] / steps,
        "steps": metrics["train_steps"], "runtime_seconds": metrics["train_runtime"],
        "real_tokens": counter.real, "computed_tokens": counter.computed,
        "rows": len(counter.row_lengths), "sum_squared_row_lengths": sum(n * n for n in counter.row_lengths),
        "process_cpu_seconds": cpu_seconds, "real_tokens_per_cpu_second": counter.real / cpu_seconds,
        "row_order_digest": counter.row_order_digest, "micro_batch_digest": counter.micro_batch_digest,
        "trainer_num_input_tokens_seen": metrics["train_tokens"], "train_loss": metrics["train_loss"],
        "configuration": {k: getattr(config, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "train_sampling_strategy", "padding_free",
            "packing", "gradient_checkpointing", "optim", "lm_head_labelled_only", "precision", "attn_implementation",
            "torch_compile")},
        "attention": model.config._attn_implementation, "threads": torch.get_num_threads(),
    }
    result["worst_case_peak_memory_bytes"], result["worst_case_micro_batch_tokens"] = _worst_case_step(
        trainer, data, config, cuda)
    return result


def _worst_case_step(trainer, data, config, cuda: bool) -> tuple[int, int]:
    """Peak memory of one more forward/backward on the `per_device_train_batch_size` longest training rows:
    the largest micro-batch this configuration can meet on this data (random order may not meet it)."""
    import torch

    from .memory import worst_case_rows

    rows = worst_case_rows(data.examples("train"), config.per_device_train_batch_size, config.packing, config.max_length)
    batch = trainer.data_collator.collator(rows)
    batch = {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    trainer.model.train()
    if cuda:  # from what stays allocated (weights, adapters, optimizer state) to this step's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.training_step(trainer.model, batch)
    tokens = int(batch["input_ids"].numel())
    if cuda:
        return int(torch.cuda.max_memory_reserved()), tokens
    return _peak_rss_bytes(), tokens  # a high-water mark: the run's peak if that was higher


def _add_mfu(result: dict, prepared: dict) -> None:
    """Model FLOPs utilisation: (4 x matmul parameters x real tokens + attention FLOPs) per second over the
    measured bf16 matmul peak. 4 = forward (2) + backward to the activations (2): the base is frozen, so
    it gets no weight gradients (LoRA's are negligible). Attention per row of length L and per layer:
    2 d L^2 forward (causal QK^T and AV) + 4 d L^2 backward."""
    flops = (4 * prepared["matmul_parameters"] * result["real_tokens"]
             + 6 * prepared["hidden_size"] * prepared["num_hidden_layers"] * result["sum_squared_row_lengths"])
    result["model_flops_per_second"] = flops / result["runtime_seconds"]
    result["mfu"] = result["model_flops_per_second"] / prepared["bf16_matmul_peak_flops"]
    peak = max(result["peak_memory_bytes"], result["worst_case_peak_memory_bytes"])
    result["fits_12gb"] = peak + CUDA_CONTEXT_BYTES <= 12 * GIB


# --- evaluation (--eval) -------------------------------------------------------------------------

# The default run evaluates 500 validation rows (loss) and generates from 200 test rows (up to 256 new
# tokens each), for the base and the fine-tuned model. `--eval` keeps the rows' proportion (5:2) at a tenth
# and halves the budget, so that a side-by-side run with repeats fits a few minutes on 2 cores.
EVAL_ROWS, EVAL_MAX_NEW_TOKENS = 50, 128
EVAL_PATHS = {  # name -> (evaluate_loss labelled_only, generate batch_size, merge_lora, batching)
    "before": (False, 8, False, "static"),  # before issue 12: full logits, batches of 8 each waiting for its longest, LoRA unmerged
    "today": (True, None, None, "continuous"),  # the defaults: labelled positions only, continuous batching, merged where exact
}


@contextlib.contextmanager
def forced_stops(model, eos_token_id: int, mean_length: float, seed: int = 0, positions: int = 8192):
    """A realistic stopping pattern for a model that never stops (random weights): within this block the model's
    logits force the EOS at a fixed random set of positions, each position a stop with probability 1/mean_length,
    so that every answer ends at the first such position after its prompt: answer lengths are geometric with that
    mean (long-tailed, like real answers; capped by the budget). Keyed on the position ids the model receives, so
    that `generate` and continuous batching (and any batch layout) stop every answer at the same token."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    stops = torch.rand(positions, generator=generator) < 1 / mean_length
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = {}

    def before(module, args, kwargs):
        seen["positions"], seen["keep"] = kwargs.get("position_ids"), kwargs.get("logits_to_keep", 0)

    def after(module, args, kwargs, output):
        position_ids, keep = seen["positions"], seen["keep"]
        if position_ids is None:
            raise RuntimeError("forced_stops needs the position ids the model is called with")
        logits = output.logits
        if isinstance(keep, torch.Tensor):
            position_ids = position_ids[:, keep]
        else:
            position_ids = position_ids[:, -logits.shape[1]:]
        stop = stops.to(logits.device)[position_ids.clamp(max=positions - 1)]  # [batch, positions]
        logits[stop] = torch.finfo(logits.dtype).min
        logits[..., eos_token_id][stop] = 0.0
        return output

    handles = [inner.register_forward_pre_hook(before, with_kwargs=True),
               inner.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main_eval(opts, preset: dict) -> dict:
    rows = EVAL_ROWS if opts.rows is None else opts.rows
    if opts.max_new_tokens < 1:
        raise UserError(f"bench: --max_new_tokens must be >= 1, got {opts.max_new_tokens}")
    device = "cuda" if opts.preset == "gpu" else "cpu"
    with tempfile.TemporaryDirectory(prefix="tinyllama-ft-bench-") as tmp:
        tmp = Path(tmp)
        prepared = _run_worker(tmp, "prepare", dict(preset=opts.preset, folder=str(tmp / "model"),
                                                    model=preset["model"], device=device))
        print(f"bench: evaluating {rows} validation rows and {max(rows * 2 // 5, 1)} generations of up to "
              f"{opts.max_new_tokens} tokens, base and fine-tuned, {opts.repeat} time(s) per path ...",
              file=sys.stderr, flush=True)
        report = _run_worker(tmp, "evaluate", dict(
            name="evaluate", device=device, tmp=str(tmp), threads=opts.threads, repeat=opts.repeat, rows=rows,
            max_new_tokens=opts.max_new_tokens, model_name_or_path=prepared["folder"], dataset=bench_dataset()))
    report |= {"preset": opts.preset, "device": prepared["device_name"], "model": prepared["model"]}
    print(format_eval_table(report))
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _evaluate(spec: dict) -> dict:
    """Both evaluation paths on the same model (LoRA with random B, so that fine-tuned differs from base),
    interleaved `repeat` times; per path the fastest run, and how far its numbers are from the other's."""
    import torch

    from .config import parse_config
    from .evaluate import evaluate_loss, generate
    from .modeling import load_tokenizer
    from .train import prepare_data, setup_model

    generated = max(spec["rows"] * 2 // 5, 1)
    config = parse_config([], model_name_or_path=spec["model_name_or_path"], dataset_name=spec["dataset"],
                          output_dir=str(Path(spec["tmp"]) / "run"), train_size=16, eval_size=spec["rows"],
                          test_size=generated, num_generate=generated, max_new_tokens=spec["max_new_tokens"],
                          max_length=1024, lora_dropout=0.0, report_to="none", use_cpu=spec["device"] == "cpu",
                          precision="fp32" if spec["device"] == "cpu" else "auto")
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    model = setup_model(config, tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:  # LoRA's B starts at zero: give it weights, so the adapters matter
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    examples = data.examples("validation")
    prompts = [data.rows[i] for i in data.generate_rows]
    # the test rows' reference answers, in tokens (response + EOS: the labelled tokens), set the stopping pattern
    reference = [sum(label != -100 for label in data.encoded[i]["labels"]) for i in data.generate_rows]
    mean_length = sum(min(n, config.max_new_tokens) for n in reference) / len(reference)

    def one(labelled_only, batch_size, merge, batching) -> dict:
        result = {}
        for side in ("base", "tuned"):
            with model.disable_adapter() if side == "base" else contextlib.nullcontext():
                start = time.perf_counter()
                loss = evaluate_loss(model, examples, tokenizer.pad_token_id, config.per_device_eval_batch_size,
                                     eos_token_id=tokenizer.eos_token_id, labelled_only=labelled_only, progress=False)
                middle = time.perf_counter()
                with forced_stops(model, tokenizer.eos_token_id, mean_length):
                    texts = generate(model, tokenizer, [r["instruction"] for r in prompts],
                                     [r["context"] for r in prompts], config.max_new_tokens, progress=False,
                                     **({} if batch_size is None else {"batch_size": batch_size}),
                                     merge_lora=merge, batching=batching)
                end = time.perf_counter()
            tokens = sum(t["tokens"] for t in texts)
            result[side] = {"loss": loss["loss"], "eos_logprob": loss["eos_logprob"], "loss_seconds": middle - start,
                            "generation_seconds": end - middle, "generated_tokens": tokens,
                            "generation_tokens_per_second": tokens / (end - middle), "texts": [t["text"] for t in texts],
                            "answer_tokens": [t["tokens"] for t in texts], "ended": sum(t["ended"] for t in texts)}
        result["seconds"] = sum(result[s]["loss_seconds"] + result[s]["generation_seconds"] for s in ("base", "tuned"))
        return result

    with model.disable_adapter():  # warm-up, untimed: first calls pay one-off kernel and import costs
        evaluate_loss(model, examples[:2], tokenizer.pad_token_id, labelled_only=False, progress=False)
        evaluate_loss(model, examples[:2], tokenizer.pad_token_id, progress=False)
        for batching in ("static", "continuous"):
            generate(model, tokenizer, prompts[0]["instruction"], max_new_tokens=2, progress=False, batching=batching)
    best: dict[str, dict] = {}
    for _ in range(spec["repeat"]):
        for name, knobs in EVAL_PATHS.items():
            result = one(*knobs)
            runs = best.get(name, {}).get("runs", []) + [result["seconds"]]
            if name not in best or result["seconds"] < best[name]["seconds"]:
                best[name] = result
            best[name]["runs"] = runs
    before, today = best["before"], best["today"]
    report = {"validation_rows": len(examples), "generated_rows": len(prompts), "max_new_tokens": config.max_new_tokens,
              "threads": torch.get_num_threads(), "repeat": spec["repeat"], "before": before, "today": today,
              "speedup": before["seconds"] / today["seconds"]}
    report["max_relative_difference"] = max(
        abs(today[s][k] - before[s][k]) / abs(before[s][k]) for s in ("base", "tuned") for k in ("loss", "eos_logprob"))
    report["identical_texts"] = sum(a == b for s in ("base", "tuned")
                                    for a, b in zip(today[s]["texts"], before[s]["texts"]))
    report["texts"] = 2 * len(prompts)
    report["stopping"] = {"mean_reference_tokens": mean_length, "reference_tokens": reference,
                          "answer_tokens": [t for s in ("base", "tuned") for t in today[s]["answer_tokens"]]}
    report["identical_answer_lengths"] = sum(a == b for s in ("base", "tuned")
                                             for a, b in zip(today[s]["answer_tokens"], before[s]["answer_tokens"]))
    return report


def format_eval_table(report: dict) -> str:
    lines = [f"bench --eval --preset {report['preset']} on {report['device']}, {report['threads']} threads: model "
             f"{report['model']}; {report['validation_rows']} validation rows, {report['generated_rows']} generations "
             f"of up to {report['max_new_tokens']} tokens, base + fine-tuned, best of {report['repeat']}",
             f"{'path':<8}{'side':<7}{'loss s':>8}{'generate s':>12}{'gen tok/s':>11}{'loss':>12}{'eos_logprob':>13}"]
    for name in ("before", "today"):
        for side in ("base", "tuned"):
            r = report[name][side]
            lines.append(f"{name:<8}{side:<7}{r['loss_seconds']:>8.2f}{r['generation_seconds']:>12.2f}"
                         f"{r['generation_tokens_per_second']:>11.1f}{r['loss']:>12.6f}{r['eos_logprob']:>13.5f}")
        lines.append(f"{name:<8}{'total':<7}{report[name]['seconds']:>20.2f} s  (runs: "
                     + ", ".join(f"{s:.1f}" for s in report[name]["runs"]) + ")")
    stopping = report["stopping"]
    lines.append(f"stopping pattern (both paths alike): the random model's EOS forced at random positions, answers "
                 f"geometric with mean {stopping['mean_reference_tokens']:.1f} tokens (the test rows' reference answers, "
                 f"capped at {report['max_new_tokens']}); answers here: mean "
                 f"{sum(stopping['answer_tokens']) / len(stopping['answer_tokens']):.1f}, longest "
                 f"{max(stopping['answer_tokens'])} tokens")
    lines.append(f"speedup (before / today, evaluation seconds): {report['speedup']:.2f}x; largest relative difference "
                 f"in loss and eos_logprob: {report['max_relative_difference']:.1e}; identical greedy texts: "
                 f"{report['identical_texts']} of {report['texts']} (answer lengths: {report['identical_answer_lengths']})")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker(sys.argv[1])
