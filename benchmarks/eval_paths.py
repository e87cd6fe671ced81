"""The maintainers' comparison of evaluation paths: the evaluation as it was first written (full logits at every position,
generation in static batches of 8 that each wait for their longest answer, LoRA unmerged) against today's (the LM
head on labelled positions only, continuous batching, LoRA merged where exact), side by side on the same model and
rows, with how far their numbers are apart. The random model never stops by itself, so both paths run under the
same forced stopping pattern (`forced_stops`: answers of realistic, long-tailed lengths), said in the output.

    python -m benchmarks.eval_paths [--preset cpu|gpu] [--repeat N] [--rows N] [--max_new_tokens N] [--out F.json]

Run from the repository root. Each path times what `evaluate_base` + `evaluate_model` do: the validation loss
(with `eos_logprob`) and greedy generation, for the base and the fine-tuned model, in a subprocess of its own
(`tinyllama_ft.bench.worker`); the model is `bench`'s (a random Llama on the real TinyLlama tokenizer).
Not part of the package: users benchmark training with `python -m tinyllama_ft bench`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from tinyllama_ft.bench.compare import BENCH_PRESETS, _run_worker, bench_dataset
from tinyllama_ft.bench.worker import _prepare, _worker
from tinyllama_ft.errors import ArgParser, UserError

MODULE = "benchmarks.eval_paths"  # what the worker processes run (`__name__` is "__main__" under `python -m`)

# The default run evaluates 500 validation rows (loss) and generates from 200 test rows (up to 256 new
# tokens each), for the base and the fine-tuned model. This comparison keeps the rows' proportion (5:2) at a tenth
# and halves the budget, so that a side-by-side run with repeats fits a few minutes on 2 cores.
EVAL_ROWS, EVAL_MAX_NEW_TOKENS = 50, 128
EVAL_PATHS = {  # name -> (evaluate_loss labelled_only, generate batch_size, merge_lora, batching)
    "before": (False, 8, False, "static"),  # as first written: full logits, batches of 8 each waiting for its longest, LoRA unmerged
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


def main(args: list[str] | None = None) -> dict:
    parser = ArgParser(prog="python -m benchmarks.eval_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--rows", type=int, help=f"validation rows (default {EVAL_ROWS}); 2/5 as many generations")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run both paths N times, interleaved, and keep each one's fastest run")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    parser.add_argument("--max_new_tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                        help=f"generation budget per answer (default {EVAL_MAX_NEW_TOKENS})")
    opts = parser.parse_args(sys.argv[1:] if args is None else args)
    for name, least in (("threads", 1), ("repeat", 1), ("rows", 1), ("max_new_tokens", 1)):
        if getattr(opts, name) is not None and getattr(opts, name) < least:
            raise UserError(f"eval_paths: --{name} must be >= {least}, got {getattr(opts, name)}")
    if opts.out and not Path(opts.out).resolve().parent.is_dir():
        raise UserError(f"eval_paths: folder {Path(opts.out).resolve().parent} of --out does not exist")
    preset = BENCH_PRESETS[opts.preset]
    rows = EVAL_ROWS if opts.rows is None else opts.rows
    device = "cuda" if opts.preset == "gpu" else "cpu"
    with tempfile.TemporaryDirectory(prefix="tinyllama-ft-bench-") as tmp:
        tmp = Path(tmp)
        prepared = _run_worker(tmp, "prepare", dict(preset=opts.preset, folder=str(tmp / "model"),
                                                    model=preset["model"], device=device))
        print(f"bench: evaluating {rows} validation rows and {max(rows * 2 // 5, 1)} generations of up to "
              f"{opts.max_new_tokens} tokens, base and fine-tuned, {opts.repeat} time(s) per path ...",
              file=sys.stderr, flush=True)
        report = _run_worker(tmp, "evaluate", module=MODULE, spec=dict(
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

    from tinyllama_ft.settings.config import parse_config
    from tinyllama_ft.data.prepare import prepare_data
    from tinyllama_ft.evaluation.dolly import evaluate_loss
    from tinyllama_ft.model.generation import generate
    from tinyllama_ft.model.loading import load_tokenizer
    from tinyllama_ft.training.sft import setup_model

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
    lines = [f"eval_paths --preset {report['preset']} on {report['device']}, {report['threads']} threads: model "
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
    if len(sys.argv) == 2 and sys.argv[1].endswith(".spec.json"):  # a worker process of `_run_worker`
        _worker(sys.argv[1], {"prepare": _prepare, "evaluate": _evaluate})
    else:
        try:
            main()
        except UserError as error:  # one line, exit 2, as the package's commands
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
