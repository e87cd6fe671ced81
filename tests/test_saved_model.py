"""One way in to a saved model (`storage/saved_model.py`'s `load_saved`): every command that uses one (generate, chat,
serve, export as safetensors and as GGUF) accepts the same folders: a run folder, one of its
`checkpoint-N` folders (with the run's settings) and a merged export, and gives the same answer from each.
Exports that fail leave nothing behind."""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import pytest

from tinyllama_ft.cli import main
from tinyllama_ft.errors import UserError
from tinyllama_ft.export.merged import export_merged
from tinyllama_ft.model.generation import generate
from tinyllama_ft.storage.saved_model import load_saved, run_folder_of, saved_system_prompt

from runs import smoke_run

PROMPT, NEW_TOKENS = "Name three primes.", 8
KINDS = ("run", "checkpoint", "merged")


def test_a_checkpoint_reads_the_settings_of_its_run(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"system_prompt": "Be brief.", "model_name_or_path": "m"}), encoding="utf-8")
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    assert run_folder_of(checkpoint) == tmp_path and saved_system_prompt(str(checkpoint)) == "Be brief."
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    assert run_folder_of(other) == other and saved_system_prompt(str(other)) is None
    (tmp_path / "run_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="holds no JSON object"):
        saved_system_prompt(str(checkpoint))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    run = smoke_run()  # the smoke preset: 6 steps, checkpoints every 3
    merged = tmp_path_factory.mktemp("exports") / "smoke-merged"
    export_merged(str(run), str(merged))
    return {"run": run, "checkpoint": run / "checkpoint-6", "merged": merged}


@pytest.fixture(scope="module")
def expected(folders) -> str:
    model, tokenizer = load_saved(str(folders["run"]), device="cpu")
    return generate(model, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS, progress=False)["text"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_command_accepts_every_saved_folder(kind, folders, expected, tmp_path, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    from tinyllama_ft.inference.serve import app_for

    folder = str(folders[kind])
    assert main(["generate", "--adapter", folder, "--instruction", PROMPT, "--max_new_tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n/exit\n"))
    assert main(["chat", "--adapter", folder, "--max_new_tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"

    app, name = app_for(folder)  # what `serve` serves, asked over HTTP (httpx, in process)
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"model": name, "max_tokens": NEW_TOKENS,
                                                          "messages": [{"role": "user", "content": PROMPT}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].strip() == expected

    assert main(["export", "--adapter", folder, "--out", str(tmp_path / "merged")]) == 0
    model, tokenizer = load_saved(str(tmp_path / "merged"), device="cpu")
    assert generate(model, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS, progress=False)["text"] == expected
    assert main(["export", "--adapter", folder, "--out", str(tmp_path / "gguf"), "--format", "gguf"]) == 0
    (written,) = (tmp_path / "gguf").glob("*.gguf")
    assert written.stat().st_size > 0 and (tmp_path / "gguf" / "Modelfile").is_file()
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_an_export_that_fails_leaves_nothing_behind(fmt, folders, tmp_path, monkeypatch):
    """A failure while the files are written (here: the disk fills up) leaves no `--out` folder and no
    temporary folder, beside it or in the system's temporary folder."""
    import tinyllama_ft.export.merged as export
    import tinyllama_ft.export.gguf as gguf_export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export if fmt == "safetensors" else gguf_export,
                        "write_card" if fmt == "safetensors" else "write_modelfile", disk_full)
    temp = {p.name for p in Path(tempfile.gettempdir()).iterdir()}
    out = tmp_path / "exports" / "out"
    with pytest.raises(OSError, match="No space left"):
        (export.export_merged(str(folders["run"]), str(out)) if fmt == "safetensors"
         else gguf_export.export_gguf(str(folders["run"]), str(out)))
    assert not out.parent.exists()  # nothing at all: not even the folder the export made for `--out`
    left = {p.name for p in Path(tempfile.gettempdir()).iterdir()} - temp
    assert not [name for name in left if name.startswith((".merging-", ".gguf-"))], left


@pytest.mark.slow  # a short stories260k run on its weights saved in bf16, then the export (~40 s)
def test_the_merged_export_keeps_the_base_checkpoints_dtype(tmp_path, stories_dir, dolly_path, caplog):
    """A bf16 base trained and merged on the CPU in fp32 is still written in bf16 (not twice its size in fp32), and
    answers with the adapter's greedy tokens."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runs import cli

    base = tmp_path / "stories-bf16"
    AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(base)
    run = tmp_path / "run"
    cli("train", "--model_name_or_path", base, "--dataset_name", dolly_path, "--output_dir", run, "--max_length", 512,
        "--train_size", 64, "--eval_size", 8, "--test_size", 8, "--num_generate", 0, "--max_steps", 6,
        "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1, "--learning_rate", "3e-3",
        "--eval_steps", 1000, "--save_steps", 1000, "--precision", "fp32", "--lora_r", 8, "--lora_alpha", 16)
    with caplog.at_level("INFO", logger="tinyllama_ft.export.merged"):
        merged = export_merged(str(run), str(tmp_path / "merged"))
    assert any("in bfloat16" in r.getMessage() for r in caplog.records)  # it says which dtype it wrote
    assert json.loads((merged / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"
    with safe_open(merged / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    prompts = ["Name three primes.", "Give me three uses of a brick.", "Who wrote Hamlet?", "What is a noun?"]
    adapter, tokenizer = load_saved(str(run), device="cpu")
    expected = [generate(adapter, tokenizer, p, max_new_tokens=16, progress=False)["text"] for p in prompts]
    model, tokenizer = load_saved(str(merged), device="cpu")
    assert [generate(model, tokenizer, p, max_new_tokens=16, progress=False)["text"] for p in prompts] == expected
