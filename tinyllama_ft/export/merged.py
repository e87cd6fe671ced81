"""A standalone model from a saved one: the adapter merged into the base weights, saved as a transformers
folder (and, on request, uploaded to the hub). `export --format gguf` is `gguf.py`'s."""

from __future__ import annotations

import logging
from pathlib import Path

from peft import PeftConfig

from ..errors import UserError, on_failure
from ..model.loading import stored_dtype
from ..report.card import read_run, write_card
from ..settings.paths import recorded
from ..storage.files import write_json, written_folder
from ..storage.lock import folder_lock
from ..storage.saved_model import load_merged, run_folder_of

log = logging.getLogger(__name__)


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
    """Merge the adapter into the base weights (`load_merged`, in fp32) and save a standalone folder in the
    base checkpoint's own dtype (`stored_dtype`: a bf16 base gives a bf16 export, whatever device or precision
    ran), with the tokenizer and chat template, a generation config with the right EOS, the run's settings and
    model card. Written into a hidden folder and renamed: `out_dir` is whole or absent."""
    out = Path(out_dir)
    with on_failure(out, f"{out} was not created"), folder_lock(out, "export"):
        check_export_out(adapter_dir, out)
        merged, tokenizer = load_merged(adapter_dir)  # checks the folder first
        dtype = stored_dtype(source_checkpoint(adapter_dir))
        merged = merged.to(dtype)  # rounded once, after the merge
        run = run_folder_of(adapter_dir)  # a checkpoint's settings are its run's
        with written_folder(out, "export") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if (run / "run_config.json").is_file():  # the system prompt travels with the model; no path of this machine
                write_json(tmp / "run_config.json", recorded(read_run(run)[0], public=True))
            write_card(tmp, *read_run(run), tokenizer, merged_to=out_dir)
    log.info("wrote %s in %s, the dtype of the base checkpoint %s", out, str(dtype).removeprefix("torch."),
             source_checkpoint(adapter_dir))
    return out


def source_checkpoint(folder: str) -> str:
    """The checkpoint whose weights an export starts from: a run's base model, or a merged export itself."""
    if (Path(folder) / "adapter_config.json").is_file():
        return PeftConfig.from_pretrained(folder).base_model_name_or_path
    return folder


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
