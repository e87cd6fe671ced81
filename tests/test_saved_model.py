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
    assert not out.exists() and list(out.parent.iterdir()) == []
    left = {p.name for p in Path(tempfile.gettempdir()).iterdir()} - temp
    assert not [name for name in left if name.startswith((".merging-", ".gguf-"))], left
