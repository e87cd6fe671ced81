"""Where a run trains: no silent CPU fall-back for a model too big for it (`settings/device.py`), the device and
precision line of every run, and `doctor`'s report of what the machine can do."""

import logging
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, asset
from tinyllama_ft import parse_config
from tinyllama_ft.errors import UserError
from tinyllama_ft.settings.device import (CPU_PARAMETER_LIMIT, accelerator, check_training_device, cuda_build,
                                          install_command)

TINYLLAMA = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
TINYLLAMA_PARAMETERS = 1_100_048_384
cpu_only = pytest.mark.skipif(accelerator() is not None, reason="an accelerator is visible: nothing is refused")


def hub_cache_with_tinyllama_config(tmp_path):
    """A hub cache holding TinyLlama's config.json only, laid out as huggingface_hub lays out a download."""
    repo = tmp_path / "hub" / "models--TinyLlama--TinyLlama-1.1B-Chat-v1.0"
    if repo.is_dir():
        return tmp_path / "hub"
    revision = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    config = asset("tinyllama-1.1b-config") / "config.json"
    (repo / "snapshots" / revision / "config.json").write_bytes(config.read_bytes())
    return tmp_path / "hub"


def run(args, tmp_path, **env):
    environ = os.environ | {"HF_HUB_CACHE": str(hub_cache_with_tinyllama_config(tmp_path)), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=environ | env)


@cpu_only
def test_the_real_run_refuses_on_a_cpu_machine_in_one_line_naming_both_fixes(tmp_path):
    done = run(["-m", "tinyllama_ft", "train", "--output_dir", "runs/real"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no GPU is visible"), done.stderr
    assert f"{TINYLLAMA_PARAMETERS:,} parameters" in lines[0] and f"{CPU_PARAMETER_LIMIT:,}" in lines[0]
    assert "--index-url https://download.pytorch.org/whl/cu" in lines[0] and "--use_cpu true" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written or loaded


@cpu_only
def test_the_notebooks_path_gets_the_same_refusal_as_a_user_error(tmp_path):
    code = ("from tinyllama_ft import parse_config, train\nfrom tinyllama_ft.errors import UserError\n"
            "try:\n    train(parse_config(output_dir='runs/real'))\nexcept UserError as error:\n    print(error)\n")
    done = run(["-c", code], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("no GPU is visible"), done.stderr[-2000:]
    assert "--use_cpu true" in done.stdout and not (tmp_path / "runs").exists()


@cpu_only
def test_use_cpu_true_insists_and_bf16_alone_does_not(tmp_path):
    """bf16 on a CPU-only machine sets use_cpu itself (transformers needs it): that is no request for the CPU."""
    insisted = parse_config(["--use_cpu", "true", "--output_dir", str(tmp_path / "a")])
    check_training_device(insisted, TINYLLAMA, TINYLLAMA_PARAMETERS)
    bf16 = parse_config(["--precision", "bf16", "--output_dir", str(tmp_path / "b")])
    assert bf16.use_cpu  # set for transformers ...
    with pytest.raises(UserError, match="--use_cpu true"):  # ... but not asked for
        check_training_device(bf16, TINYLLAMA, TINYLLAMA_PARAMETERS)
    check_training_device(bf16, "small", CPU_PARAMETER_LIMIT)  # at the limit: trains


def test_small_models_pass_the_check_and_every_run_logs_its_device_and_precision(stories_dir, dolly_path, tmp_path,
                                                                                    caplog):
    from tinyllama_ft.training.sft import Run

    for model in (stories_dir, "tiny-random-llama"):
        config = parse_config([], model_name_or_path=model, dataset_name=dolly_path, output_dir=str(tmp_path / "x"),
                              max_length=512, train_size=16, eval_size=0, test_size=0, num_generate=0)
        run = Run(config)
        with caplog.at_level(logging.INFO, logger="tinyllama_ft.training.sft"):
            run.check()
            run.prepare_data()
            assert not [r for r in caplog.records if r.getMessage().startswith("training on ")]  # bad data: its error only
            run.load_model()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on ")]
        assert len(lines) == 1 and f"precision {config.precision}" in lines[0]
        assert ("the CPU" if accelerator() is None else accelerator()) in lines[0]
        caplog.clear()


def test_the_cuda_build_is_the_newest_the_driver_runs():
    assert cuda_build((13, 1)) == "cu130" and cuda_build((12, 9)) == "cu128" and cuda_build((12, 6)) == "cu126"
    assert install_command("cu128") == ("pip install --force-reinstall torch --index-url "
                                        "https://download.pytorch.org/whl/cu128")


DOCTOR_LINES = ["python", "torch", "gpu", "bf16", "flash-attn", "bitsandbytes", "transformers", "trl", "peft",
                "accelerate", "datasets", "disk (here)", "disk (hub cache)", "hub"]


def test_doctor_reports_every_line_offline_without_downloading(tmp_path):
    for command in ("doctor", "env"):
        done = run(["-m", "tinyllama_ft", command], tmp_path)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        names = [line.split("  ")[0].strip() for line in done.stdout.splitlines()]
        assert names == DOCTOR_LINES, done.stdout
        facts = dict(line.split("  ", 1) for line in done.stdout.splitlines())
        import torch

        assert torch.__version__ in facts["torch"] and "offline (HF_HUB_OFFLINE" in facts["hub"]
        if not torch.cuda.is_available() and torch.version.cuda is None:  # the fix for a CPU-only build
            assert "--index-url https://download.pytorch.org/whl/cu" in facts["torch"]
    hub = tmp_path / "hub"
    assert sorted(p.name for p in hub.rglob("*") if p.is_file()) == ["config.json", "main"]  # nothing downloaded


def test_doctor_says_when_the_hub_does_not_answer(tmp_path):
    done = run(["-m", "tinyllama_ft", "doctor"], tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    hub = [line for line in done.stdout.splitlines() if line.startswith("hub")]
    assert done.returncode == 0 and hub and "http://127.0.0.1:9" in hub[0] and "HF_HUB_OFFLINE=1" in hub[0], done


def test_doctor_takes_under_five_seconds():
    from tinyllama_ft.settings.doctor import report

    start = time.perf_counter()
    lines = report()
    assert time.perf_counter() - start < 5 and len(lines) == len(DOCTOR_LINES)
