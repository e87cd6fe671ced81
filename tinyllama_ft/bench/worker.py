"""What runs in a process of its own for `bench` (and `benchmarks/eval_paths.py`): `python -m
tinyllama_ft.bench.worker SPEC.json` prepares the benchmark model or trains one configuration and writes its
measurements (real tokens per second, padding share, peak memory...) as JSON where the spec says."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..errors import UserError
from .compare import _architecture_source, _tokenizer_source


def _worker(spec_path: str, workers: dict | None = None) -> None:
    """Run the job of kind `spec["kind"]` (`workers`: kind -> function; default prepare and train) and write its
    result as JSON where the spec says."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    try:
        result = (workers or {"prepare": _prepare, "train": _train})[spec["kind"]](spec)
    except UserError as error:  # reported by the parent as one line
        result = {"error": str(error)}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


def _prepare(spec: dict) -> dict:
    """Write the benchmark model (random weights) with the real TinyLlama tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..model.loading import load_tokenizer

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
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
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

    from ..settings.config import parse_config
    from ..model.loading import load_tokenizer
    from ..data.prepare import prepare_data
    from ..training.sft import build_trainer, fit, setup_model

    cuda = spec["device"] == "cuda"
    if cuda and spec.get("max_memory_gib"):  # before anything is allocated: the cap the whole run lives under
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["max_memory_gib"] * 2 ** 30 / total))
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

    from ..settings.memory import worst_case_rows

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


if __name__ == "__main__":
    _worker(sys.argv[1])
