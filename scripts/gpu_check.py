"""The GPU check: everything the CPU cannot prove, in one call on a lent CUDA machine, in under 8 minutes.

    scripts/gpu_check_prepare.sh            # here, once: wheels + assets into .gpu/ (gitignored, < 64 MiB)
    python scripts/gpu_check.py --out DIR   # there (see docs/PERFORMANCE.md, "GPU check", for the device call)
    python scripts/gpu_check.py --dry-run --out DIR   # on CPU: tiny shapes, every step run (tests/test_gpu_check.py)

Steps, in order (each a subprocess through the project's own command line or API, each with the time left;
a step that fails is recorded with its last lines and the next one runs):

1. versions: Python, torch, CUDA, the card, transformers, TRL, PEFT, accelerate, datasets, bitsandbytes, liger;
2. `bench --preset gpu --candidates` under a 12 GB cap (`--max_memory_gib 12`), then uncapped (seed and default);
3. `train` at TinyLlama's shape (random weights) in bf16 and in fp16, each with evaluation, generation and
   save, then `generate` from the saved run (reload) and a merged `export`; for fp16 also the loss scaler's
   scale after training and the dtype of every LoRA gradient (fp32: no gradient in fp16);
4. QLoRA (`--load_in_4bit true`) with its peak memory;
5. Liger kernels on and off (tokens/s, peak memory);
6. the notebook's code cells, in order in one namespace (the device image has no Jupyter kernel), on CUDA.

Everything is written to DIR/gpu_check.md (the tables) and DIR/gpu_check.json (all numbers), and the
output of every command to DIR/gpu_check.log: three files (the device returns at most 8).
With --dry-run the same steps run on CPU at tiny shapes (the bench's cpu preset, the smoke preset's sizes,
bf16 where the step is bf16, and the scaler/gradient check in bf16); steps that need CUDA (fp16 weights, QLoRA, Liger) run their command and must end in the project's
one-line refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_SECONDS = 450  # 7.5 minutes: the check must end within 8


class Check:
    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.dry_run, self.deadline = out, dry_run, time.monotonic() + budget
        self.sections: list[str] = []
        self.results: dict[str, dict] = {}
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, *args, expect_fail: bool = False) -> subprocess.CompletedProcess:
        """Run one command with the time left; its output goes to the log."""
        args = [str(a) for a in args]
        self.log.write(f"\n$ {' '.join(args)}\n")
        self.log.flush()
        start = time.monotonic()
        try:
            done = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                  timeout=max(self.left(), 1))
        except subprocess.TimeoutExpired as error:
            self.log.write(f"(stopped: out of time after {time.monotonic() - start:.0f} s)\n")
            raise RuntimeError(f"out of time: {' '.join(args[:4])} ...") from error
        self.log.write(done.stdout + done.stderr + f"(exit {done.returncode}, {time.monotonic() - start:.1f} s)\n")
        self.log.flush()
        if (done.returncode != 0) != expect_fail:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"exit {done.returncode}: {tail[0]}")
        return done

    def python(self, code: str, *args) -> dict:
        """Run `code` in a fresh interpreter; it prints one JSON object last."""
        done = self.command(sys.executable, "-c", code, *args)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def step(self, name: str, function) -> None:
        if self.left() <= 5:
            self.results[name] = {"status": "skipped: out of time"}
            self.sections.append(f"## {name}\n\nskipped: out of time\n")
            return
        start = time.monotonic()
        try:
            result, table = function(self)
            result["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - every step is recorded, the next one runs
            result, table = {"status": f"failed: {error}"}, f"FAILED: {error}"
        result["seconds"] = round(time.monotonic() - start, 1)
        self.results[name] = result
        self.sections.append(f"## {name} ({result['seconds']} s)\n\n{table}\n")
        print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", flush=True)

    def finish(self) -> int:
        header = (f"# GPU check{' (dry run on CPU)' if self.dry_run else ''}\n\n"
                  f"load average at the end: {_loadavg()}\n")
        (self.out / "gpu_check.md").write_text(header + "\n" + "\n".join(self.sections), encoding="utf-8")
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n", encoding="utf-8")
        self.log.close()
        failed = [name for name, r in self.results.items() if r["status"] != "ok"]
        print("\n".join(self.sections))
        print(f"gpu_check: {len(self.results) - len(failed)} of {len(self.results)} steps ok"
              + (f"; not ok: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "unknown"


# --- steps -----------------------------------------------------------------------------------------------

VERSIONS = """
import importlib.metadata as m, json, platform, torch
names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
         "rouge-score", "sacrebleu", "gguf", "pyarrow", "tokenizers"]
versions = {}
for name in names:
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        versions[name] = None
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "packages": versions, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if cuda else "CPU",
                  "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                  "bf16": torch.cuda.is_bf16_supported() if cuda else None}))
"""


def versions(check: Check):
    result = check.python(VERSIONS)
    rows = "\n".join(f"| {k} | {v} |" for k, v in result["packages"].items())
    table = (f"device {result['device']} ({result['memory_gib'] or 0:.0f} GiB), CUDA {result['cuda']}, Python "
             f"{result['python']}, bf16 {result['bf16']}\n\n| package | version |\n|---|---|\n{rows}")
    return result, table


def bench(capped: bool):
    def run(check: Check):
        out = Path(check.tmp) / f"bench-{'capped' if capped else 'uncapped'}.json"
        if check.dry_run:
            args = ["--preset", "cpu", "--rows", "16"] + (["--candidates", "default_checkpointing"] if capped else [])
        else:
            args = ["--preset", "gpu", "--rows", "320"] + (["--candidates", "--max_memory_gib", "12"] if capped else [])
        done = check.command(sys.executable, "-m", "tinyllama_ft", "bench", *args, "--out", out)
        report = json.loads(out.read_text())
        return report, "```\n" + done.stdout.strip() + "\n```"
    return run


TINYLLAMA_SHAPE = """
import json, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
assets, folder, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
tokenizer = AutoTokenizer.from_pretrained(f"{assets}/tinyllama-tokenizer")
config = LlamaConfig.from_pretrained(f"{assets}/tinyllama-1.1b-config")
if dry:  # tiny shapes on CPU: the bench's cpu model, shrunk
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 176, 2
    config.num_attention_heads, config.num_key_value_heads = 4, 2
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.float32 if dry else torch.bfloat16)
model.save_pretrained(folder)
tokenizer.save_pretrained(folder)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
"""


def _model(check: Check) -> str:
    folder = Path(check.tmp) / "tinyllama-shape"
    if not folder.is_dir():
        check.python(TINYLLAMA_SHAPE, check.assets, folder, int(check.dry_run))
    return str(folder)


def _train_args(check: Check, name: str, *extra) -> list:
    sizes = (["--train_size", 32, "--eval_size", 8, "--test_size", 4, "--num_generate", 4, "--max_new_tokens", 8,
              "--max_steps", 2, "--max_length", 256] if check.dry_run else
             ["--train_size", 256, "--eval_size", 64, "--test_size", 16, "--num_generate", 16, "--max_new_tokens", 64,
              "--max_steps", 16])
    return [sys.executable, "-m", "tinyllama_ft", "train", "--model_name_or_path", _model(check), "--dataset_name",
            f"{check.assets}/dolly/dolly-sample-1109.jsonl", "--output_dir", Path(check.tmp) / "runs" / name,
            "--overwrite_output_dir", "true", "--logging_steps", 1, "--eval_steps", 1000, "--save_steps", 1000,
            "--report_to", "none", "--disable_tqdm", "true", *sizes, *extra]


def _metrics(check: Check, name: str) -> dict:
    metrics = json.loads((Path(check.tmp) / "runs" / name / "metrics.json").read_text())
    keep = ("train_loss", "train_tokens_per_second", "peak_memory_reserved_bytes", "eval_loss", "base_eval_loss",
            "eos_rate", "rougeL", "timings", "peak_memory_bytes_by_stage", "gradient_checkpointing_decision")
    return {k: metrics.get(k) for k in keep}


def _row(name: str, m: dict) -> str:
    """The run's numbers, with the planner's promise for the training stage against each stage's peak (CUDA)."""
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    peak, stages = m.get("peak_memory_reserved_bytes"), m.get("peak_memory_bytes_by_stage") or {}
    predicted = (m.get("gradient_checkpointing_decision") or {}).get("predicted_peak_bytes")
    highest = max(stages, key=stages.get) if stages else "-"
    return (f"| {name} | {m['train_loss']:.4f} | {m['train_tokens_per_second']:.0f} | {gib(peak)} | "
            f"{m.get('eval_loss') or float('nan'):.4f} | {gib(stages.get('train'))} | {gib(predicted)} | {highest} |")


HEAD = ("| run | train loss | tokens/s | peak reserved GiB | eval loss | train stage peak GiB | planner's promise GiB "
        "| highest stage |\n|---|---|---|---|---|---|---|---|")


def train_precision(precision: str):
    def run(check: Check):
        if check.dry_run and precision == "fp16":  # CPU: fp16 weights need CUDA; the refusal is the step
            done = check.command(*_train_args(check, "fp16", "--precision", "fp16"), expect_fail=True)
            line = done.stderr.strip().splitlines()[-1]
            if "needs a CUDA GPU" not in line:
                raise RuntimeError(f"expected the one-line CUDA refusal, got: {line}")
            return {"refused": line}, f"refused on CPU, as it should: `{line}`"
        name = precision
        extra = ["--precision", precision]  # bf16 runs on CPU too (autocast, base in bf16)
        check.command(*_train_args(check, name, *extra))
        run_dir = Path(check.tmp) / "runs" / name
        generated = check.command(sys.executable, "-m", "tinyllama_ft", "generate", "--adapter", run_dir,
                                  "--instruction", "Name three primary colours.", "--max_new_tokens", 8)
        export = Path(check.tmp) / f"export-{name}"
        check.command(sys.executable, "-m", "tinyllama_ft", "export", "--adapter", run_dir, "--out", export)
        result = _metrics(check, name) | {"generated": generated.stdout.strip()[-200:],
                                          "export_files": sorted(p.name for p in export.iterdir())}
        if precision == "fp16" or check.dry_run:
            result |= check.python(FP16_CHECK, _model(check), check.assets, "bf16" if check.dry_run else "fp16")
        table = HEAD + "\n" + _row(name, result)
        if "loss_scale" in result:
            table += (f"\n\nloss scale after {result['steps']} steps: {result['loss_scale']}; LoRA gradient dtypes: "
                      f"{result['gradient_dtypes']}; frozen base dtype: {result['base_dtype']}")
        return result, table
    return run


FP16_CHECK = """
import json, sys, torch
from tinyllama_ft.settings.config import parse_config
from tinyllama_ft.model.loading import load_tokenizer
from tinyllama_ft.training.sft import build_trainer, fit, prepare_data, setup_model
model_dir, assets, precision = sys.argv[1:4]
config = parse_config([], model_name_or_path=model_dir, dataset_name=f"{assets}/dolly/dolly-sample-1109.jsonl",
                      output_dir="/tmp/gpu-check-fp16", overwrite_output_dir=True, train_size=32, eval_size=0,
                      test_size=0, num_generate=0, eval_strategy="no", save_strategy="no", max_steps=3,
                      max_length=256, precision=precision, report_to="none", disable_tqdm=True)
tokenizer = load_tokenizer(model_dir)
data = prepare_data(config, tokenizer)
model = setup_model(config, tokenizer)
trainer = build_trainer(config, model, tokenizer, data)
dtypes = set()
for p in model.parameters():
    if p.requires_grad:
        p.register_hook(lambda g: dtypes.add(str(g.dtype)))
metrics = fit(trainer)
scaler = getattr(trainer.accelerator, "scaler", None)
base = next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n)
print(json.dumps({"loss_scale": None if scaler is None else scaler.get_scale(), "steps": metrics["train_steps"],
                  "gradient_dtypes": sorted(dtypes), "base_dtype": str(base.dtype), "fp16_loss": metrics["train_loss"]}))
"""


def refused_on_cpu(check: Check, name: str, *flags):
    done = check.command(*_train_args(check, name, *flags), expect_fail=True)
    line = done.stderr.strip().splitlines()[-1]
    if "needs a CUDA GPU" not in line:
        raise RuntimeError(f"expected the one-line CUDA refusal, got: {line}")
    return {"refused": line}, f"refused on CPU, as it should: `{line}`"


def qlora(check: Check):
    if check.dry_run:
        return refused_on_cpu(check, "qlora", "--load_in_4bit", "true")
    check.command(*_train_args(check, "qlora", "--load_in_4bit", "true", "--precision", "bf16"))
    result = _metrics(check, "qlora")
    return result, HEAD + "\n" + _row("QLoRA (NF4 base, bf16 compute)", result)


def liger(check: Check):
    if check.dry_run:
        return refused_on_cpu(check, "liger", "--use_liger_kernel", "true")
    rows, result = [], {}
    for on in (False, True):
        name = f"liger-{'on' if on else 'off'}"
        check.command(*_train_args(check, name, "--use_liger_kernel", str(on).lower(), "--precision", "bf16"))
        result[name] = _metrics(check, name)
        rows.append(_row(name, result[name]))
    return result, HEAD + "\n" + "\n".join(rows)


NOTEBOOK = """
import json, sys, os
cells = [c for c in json.load(open(sys.argv[1], encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
namespace = {"__name__": "__main__"}
try:  # what IPython gives every cell; the device image may have no IPython
    from IPython.display import display
except ImportError:
    display = print
namespace["display"] = display
for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    source = "\\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!")))  # no IPython magics
    exec(compile(source, f"cell {i}", "exec"), namespace)
print(json.dumps({"cells": len(cells)}))
"""


def notebook(check: Check):
    run_dir = Path(check.tmp) / "runs" / "notebook"
    check.env |= {"TINYLLAMA_FT_OUTPUT_DIR": str(run_dir), "TINYLLAMA_FT_OVERWRITE_OUTPUT_DIR": "true",
                  "MPLBACKEND": "Agg"}
    if check.dry_run:
        check.env["TINYLLAMA_FT_PRESET"] = "smoke"
    else:
        check.env |= {"TINYLLAMA_FT_MODEL_NAME_OR_PATH": _model(check), "TINYLLAMA_FT_MAX_STEPS": "8",
                      "TINYLLAMA_FT_DATASET_NAME": f"{check.assets}/dolly/dolly-sample-1109.jsonl",
                      "TINYLLAMA_FT_TRAIN_SIZE": "128", "TINYLLAMA_FT_EVAL_SIZE": "32", "TINYLLAMA_FT_TEST_SIZE": "16",
                      "TINYLLAMA_FT_NUM_GENERATE": "8", "TINYLLAMA_FT_MAX_NEW_TOKENS": "32"}
    try:
        result = check.python(NOTEBOOK, ROOT / "FineTuning_TinyLlama.ipynb")
    finally:
        for key in [k for k in check.env if k.startswith("TINYLLAMA_FT_")]:
            del check.env[key]
    result["metrics"] = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    return result, f"{result['cells']} code cells ran; the run folder holds: {', '.join(result['metrics'])}"


# --- the command -----------------------------------------------------------------------------------------

def assets_folder(tmp: str) -> str:
    """TINYLLAMA_ASSETS, else the carried .gpu/assets.tar.xz unpacked, else ../shared/assets."""
    if os.environ.get("TINYLLAMA_ASSETS"):
        return os.environ["TINYLLAMA_ASSETS"]
    carried = ROOT / ".gpu" / "assets.tar.xz"
    if carried.is_file():
        with tarfile.open(carried) as archive:
            archive.extractall(tmp, filter="data")
        return str(Path(tmp) / "assets")
    return str(ROOT.parent / "shared" / "assets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="folder for the three files")
    parser.add_argument("--dry-run", action="store_true", help="on CPU, tiny shapes, every step")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for all steps")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, opts.dry_run, opts.budget)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check.tmp = tmp
        check.assets = assets_folder(tmp)
        check.env["TINYLLAMA_ASSETS"] = check.assets
        if opts.dry_run:
            check.env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even where a GPU is visible
        steps = [("versions", versions), ("bench, 12 GB cap", bench(True)), ("bench, uncapped", bench(False)),
                 ("train bf16", train_precision("bf16")), ("train fp16", train_precision("fp16")),
                 ("QLoRA", qlora), ("Liger on and off", liger), ("notebook", notebook)]
        for name, function in steps:
            check.step(name, function)
        return check.finish()


if __name__ == "__main__":
    sys.exit(main())
