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

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ArgParser, UserError

TINYLLAMA_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]

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

# Other candidates measured for docs/PERFORMANCE.md (`--candidates [NAME ...]`): overrides of the defaults, or SEED +
# overrides. The default's gradient checkpointing decides itself ("auto", tinyllama_ft/settings/memory.py: off where the
# worst-case micro-batch's activations take at most half of the free memory, so off on the cpu preset);
# `default_checkpointing` is the default with it forced on. TRL 1.16's loss_type="chunked_nll" is no candidate:
# it is a deprecated alias of "nll", the default already run (trl/trainer/sft_config.py turns one into the other).
CANDIDATES = {
    "seed_no_checkpointing": dict(SEED, gradient_checkpointing=False),
    "seed_labelled_head": dict(SEED, lm_head_labelled_only=True),
    "default_all_positions": dict(lm_head_labelled_only=False),
    "default_checkpointing": dict(gradient_checkpointing=True),
    "default_no_checkpointing": dict(gradient_checkpointing=False),
    "default_trl_head": dict(lm_head_implementation="trl"),
    "seed_trl_head": dict(SEED, lm_head_implementation="trl"),
    "default_compiled": dict(torch_compile=True),
    "group_by_length": dict(SEED, gradient_checkpointing=False, optim="adamw_torch_fused",
                            lm_head_labelled_only=True, train_sampling_strategy="group_by_length"),
    "padding_free_4x4": dict(per_device_train_batch_size=4, gradient_accumulation_steps=4),
    "padding_free_16x1": dict(per_device_train_batch_size=16, gradient_accumulation_steps=1),
    "packing_bfd": dict(packing=True, packing_strategy="bfd", per_device_train_batch_size=1,
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
    from ..settings.config import SAMPLE_DATA

    return SAMPLE_DATA


def _tokenizer_source() -> str:
    local = assets_dir() / "tinyllama-tokenizer"
    return str(local) if local.is_dir() else TINYLLAMA_ID


def _architecture_source() -> str:
    local = assets_dir() / "tinyllama-1.1b-config"
    return str(local) if (local / "config.json").is_file() else TINYLLAMA_ID


# --- the command -------------------------------------------------------------------------------

def main(args: list[str]) -> dict:
    parser = ArgParser(prog="python -m tinyllama_ft bench",
                     description="Seed training configuration vs the project default.")
    parser.add_argument("--preset", required=True, choices=sorted(BENCH_PRESETS))
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--rows", type=int, help="training rows (one epoch; a multiple of 16 keeps every optimizer "
                        "step full). Default: 128 for cpu, 1088 for gpu")
    parser.add_argument("--candidates", nargs="*", metavar="NAME",
                        help="also measure the other candidate configurations (slower): all, or those named ("
                        + ", ".join(CANDIDATES) + ")")
    parser.add_argument("--max_memory_gib", type=float,
                        help="gpu: cap every training process at this much GPU memory "
                        "(torch.cuda.set_per_process_memory_fraction), e.g. 12 for a 12 GB card")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every configuration N times, interleaved, and keep each one's fastest run "
                        "(for a shared or noisy machine)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per training process (default: PyTorch's, one per core)")
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
        configs = {"baseline": dict(SEED, precision=precision), "default": dict(precision="auto")}
        if opts.candidates is not None:  # those built on the seed keep the seed's precision
            configs |= {name: dict(c, precision=precision if c.get("optim") == SEED["optim"] else "auto")
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

def _run_worker(tmp: Path, kind: str, spec: dict, module: str = "tinyllama_ft.bench.worker") -> dict:
    """Run a job of `module` (`python -m module SPEC`, `worker._worker`) in a fresh Python process, so that
    its peak memory is its own."""
    name = spec.get("name", kind)
    spec_path, result_path, log_path = tmp / f"{name}.spec.json", tmp / f"{name}.result.json", tmp / f"{name}.log"
    spec_path.write_text(json.dumps(dict(spec, kind=kind, result=str(result_path))), encoding="utf-8")
    result_path.unlink(missing_ok=True)  # a run repeated must not read its previous result
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.run([sys.executable, "-m", module, str(spec_path)],
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
