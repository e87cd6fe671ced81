"""Fine-tuned runs shared by the chat, serve and card tests: each is trained once per test process,
through the real command line, into a temporary folder removed at exit."""

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT, asset

_TMP = Path(tempfile.mkdtemp(prefix="tinyllama-ft-runs-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


@functools.lru_cache(maxsize=None)
def stories_run() -> Path:
    """The real pretrained stories260k, fine-tuned 10 steps on 96 real Dolly rows (~30 s on 2 CPU cores)."""
    out = _TMP / "stories"
    cli("train", "--model_name_or_path", asset("stories260k"), "--dataset_name", asset("dolly/dolly-sample-1109.jsonl"),
        "--output_dir", out, "--max_length", 512, "--train_size", 96, "--eval_size", 16, "--test_size", 16,
        "--num_generate", 4, "--max_new_tokens", 16, "--max_steps", 10, "--gradient_checkpointing", "false", "--per_device_train_batch_size", 8,
        "--gradient_accumulation_steps", 1, "--learning_rate", "3e-3", "--logging_steps", 5, "--eval_steps", 1000,
        "--save_steps", 1000, "--precision", "fp32", "--lora_r", 8, "--lora_alpha", 16)
    return out


@functools.lru_cache(maxsize=None)
def smoke_run() -> Path:
    out = _TMP / "smoke"
    cli("train", "--preset", "smoke", "--output_dir", out)
    return out


# --- the shared run exported once, for every consumer -----------------------------------------------------------

ANSWER_TOKENS = 32  # new tokens per greedy answer in the consumer tests


@functools.lru_cache(maxsize=None)
def consumer_prompts() -> tuple:
    """12 real Dolly conversations short enough for stories260k's 512 positions: 8 single turns, 2 after a system
    turn, 2 with two user turns."""
    import json

    from tinyllama_ft import encode_prompt, load_tokenizer, to_example
    from tinyllama_ft.data.encoding import find_special_text

    tokenizer = load_tokenizer(str(asset("stories260k")))
    rows = [json.loads(line) for line in open(asset("dolly/dolly-sample-1109.jsonl"), encoding="utf-8")]
    examples = [to_example(r) for r in rows
                if find_special_text(r["instruction"] + r["context"] + r["response"], tokenizer) is None]
    examples = [e for e in examples if len(encode_prompt(tokenizer, e["prompt"] + e["completion"])) < 160][:14]
    system = [{"role": "system", "content": "You are a concise assistant."}]
    prompts = [e["prompt"] for e in examples[:8]] + [system + e["prompt"] for e in examples[8:10]]
    prompts += [examples[i]["prompt"] + examples[i]["completion"] + examples[i + 1]["prompt"] for i in (10, 12)]
    return tuple(prompts)


@functools.lru_cache(maxsize=None)
def stopping_run() -> Path:
    """A random Llama (the cpu bench's: hidden 256, 4 layers) on the real TinyLlama tokenizer, fine-tuned 64 steps
    to answer each real Dolly prompt with the name of its row's category and stop (~40 s on 2 CPU cores). It
    learns the commonest, "open qa", and ends every greedy answer in EOS with a margin (top-2 logit gap >= 0.4
    at every step, measured; f16 rounding moves logits ~0.03). stories260k cannot: its EOS row is one of the
    rows pretraining never used (norm 2.7733, as ids 0, 3 and 4), so the EOS ties with those tokens whatever
    LoRA does to the hidden states ("open qa$...")."""
    import json

    from tinyllama_ft.bench.compare import BENCH_PRESETS
    from tinyllama_ft.bench.worker import _prepare

    model = _TMP / "random-llama"
    _prepare(dict(folder=str(model), model=BENCH_PRESETS["cpu"]["model"], device="cpu"))
    shutil.copy(asset("tinyllama-tokenizer/tokenizer.model"), model)  # as a hub download has it, for the GGUF
    rows = [json.loads(line) for line in open(asset("dolly/dolly-sample-1109.jsonl"), encoding="utf-8")]
    data = _TMP / "dolly-categories.jsonl"
    data.write_text("".join(json.dumps(dict(r, response=r["category"].replace("_", " "))) + "\n" for r in rows),
                    encoding="utf-8")
    out = _TMP / "stopping"
    cli("train", "--model_name_or_path", model, "--dataset_name", data, "--output_dir", out, "--max_length", 512,
        "--train_size", 512, "--eval_size", 16, "--test_size", 16, "--num_generate", 4, "--max_new_tokens", 16,
        "--max_steps", 64, "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1,
        "--learning_rate", "5e-3", "--logging_steps", 16, "--eval_steps", 1000, "--save_steps", 1000,
        "--precision", "fp32", "--lora_r", 8, "--lora_alpha", 16)
    return out


CONSUMER_RUNS = {"dolly": stories_run, "stopping": stopping_run}  # answers cut at the budget / ending in EOS


@functools.lru_cache(maxsize=None)
def consumer_exports(name: str = "dolly") -> dict:
    """CONSUMER_RUNS[name]() exported through the command line as a merged model and as an f16 GGUF (+ Modelfile),
    with `generate`'s greedy answers to consumer_prompts() on the run folder: what every consumer must answer."""
    from tinyllama_ft import generate, load_for_inference

    run = CONSUMER_RUNS[name]()
    merged, gguf = _TMP / f"consumer-{name}-merged", _TMP / f"consumer-{name}-gguf"
    cli("export", "--adapter", run, "--out", merged)
    cli("export", "--adapter", run, "--out", gguf, "--format", "gguf")
    model, tokenizer = load_for_inference(str(run), device="cpu")
    generated = generate(model, tokenizer, list(consumer_prompts()), max_new_tokens=ANSWER_TOKENS, progress=False)
    return dict(run=run, merged=merged, gguf=gguf / f"{run.name}-f16.gguf", model=(model, tokenizer),
                generated=generated)
