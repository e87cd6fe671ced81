"""A standalone model from a saved one: the adapter merged into the base weights, saved as a transformers
folder (and, on request, uploaded to the hub). `export --format gguf` is `gguf.py`'s."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError, on_failure
from ..report.card import read_run, write_card
from ..storage.files import written_folder
from ..storage.lock import folder_lock
from ..storage.saved_model import load_merged, run_folder_of


def check_export_out(adapter_dir: str, out: Path) -> None:
    """`export --out` must be a new folder outside the saved folder (and, for a checkpoint, outside its run)."""
    if out.is_file():
        raise UserError(f"--out {out} is an existing file: choose a new folder")
    if out.exists():
        raise UserError(f"{out} already exists: remove it or choose another folder")
    for folder in dict.fromkeys([Path(adapter_dir), run_folder_of(adapter_dir)]):
        if folder.resolve() in out.resolve().parents:
            raise UserError(f"--out {out} is inside the run folder {folder}: choose a folder outside it "
                            "(e.g. beside it), so the run folder stays a run")


def export_merged(adapter_dir: str, out_dir: str) -> Path:
    """Merge the adapter into the base weights (`load_merged`) and save a standalone folder
    (safetensors, tokenizer with chat template, generation config with the right EOS, the run's
    settings and model card). Written into a hidden folder and renamed: `out_dir` is whole or absent."""
    out = Path(out_dir)
    with on_failure(out, f"{out} was not created"), folder_lock(out, "export"):
        check_export_out(adapter_dir, out)
        merged, tokenizer = load_merged(adapter_dir)
        run = run_folder_of(adapter_dir)  # a checkpoint's settings are its run's
        with written_folder(out, "export") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if (run / "run_config.json").is_file():  # the system prompt travels with the model
                shutil.copy(run / "run_config.json", tmp / "run_config.json")
            write_card(tmp, *read_run(run), tokenizer, merged_to=out_dir)
    return out


def push_to_hub(folder: str, repo_id: str) -> str:
    """Upload a folder to a (private) hub repo; returns a one-line outcome. Skipped, with the reason,
    when there is no token or no network. The token is read by huggingface_hub, never printed."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        return f"push skipped: no hub token (set HF_TOKEN or run `hf auth login`); {folder} is saved locally"
    api = HfApi()
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id)
    except Exception as error:  # no network, no permission: the local folder is still complete
        return f"push skipped: could not upload to {repo_id} ({type(error).__name__}); {folder} is saved locally"
    return f"pushed {folder} to {repo_id}"
