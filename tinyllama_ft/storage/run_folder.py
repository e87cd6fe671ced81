"""The run folder's life: check `output_dir` before anything loads, resume from its checkpoints, clear
staging leftovers, save the finished run into it (atomically, `metrics.json` last), and say what to type
after a stop."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from ..errors import UserError, on_failure
from ..model.loading import is_model_folder
from ..report.card import write_card
from ..settings.config import RESUME_NEWEST, wants_resume
from ..settings.paths import recorded
from .files import finish_replacement, move, replacement_paths, swap_in, write_json
from .lock import folder_lock, remove_abandoned
from .fingerprint import FILE as FINGERPRINT_FILE

log = logging.getLogger(__name__)


@contextlib.contextmanager
def output_dir_held(config, command: str):
    """While a run (`command`: train, dpo) writes `config.output_dir`: its lock is held (a second command
    into it is refused in one line), and a file-system error escaping says, when true, that the run it
    replaces is unchanged."""
    out = Path(config.output_dir)
    replacing = replaces_a_run(config)
    intact = f"{out} still holds the previous run, unchanged" if replacing else None
    with on_failure(out, intact), folder_lock(out, command):
        try:
            with on_failure(out, intact):  # read the disk before the cleanup below frees it
                yield
        except BaseException:  # an error, Ctrl-C, SIGTERM: staging goes; checkpoints stay, to resume from
            if _main_process():
                remove_staging(out)
                if replacing:
                    _drop_replacement(out)
            raise


def _drop_replacement(out: Path) -> None:
    """After a failed run that was replacing `out`: a swap it stopped in the middle is completed (or undone),
    and its unfinished new run is deleted (it is never resumed; a finished one, whose swap was refused,
    stays, for the next command to put in place)."""
    new, old = replacement_paths(out)
    if old.exists():
        finish_replacement(out, is_finished_run)
    if new.is_dir() and not is_finished_run(new):
        shutil.rmtree(new, ignore_errors=True)


def check_output_dir(config) -> None:
    """Decide, before anything loads, what `config.output_dir` holds and whether this run may use it.

    * nothing, or nothing to lose (no complete checkpoint: a run stopped before its first one, a
      notebook's plots, staging leftovers): start; leftovers of a stopped save are removed;
    * files this project does not write (a user's own folder): refuse, whatever the flags;
    * a finished run (`metrics.json`): refuse, unless `--overwrite_output_dir true`;
    * complete checkpoints of an unfinished run: refuse, unless `--resume_from_checkpoint true`
      (continue) or `--overwrite_output_dir true` (start over).

    Overwriting deletes nothing here: the new run is written beside the old one (`training_folder`)
    and replaces it only once complete (`finish_run`), so a failed check, a crash or Ctrl-C at any
    point leaves the old run as it was."""
    path = Path(config.output_dir)
    if _main_process():
        finish_replacement(path, is_finished_run)  # a swap stopped between its two renames, or refused
        remove_abandoned(path.parent)  # what killed commands left beside it
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file, not a folder: pass a folder path (it is created)")
    resume = resume_path(config)  # an explicit checkpoint that is not one fails now, not after the model loads
    if not path.is_dir():
        _log_fresh_start(config, path)
        return
    if is_model_folder(path):
        raise UserError(f"--output_dir {path} holds a model (config.json and model weights), not a run: pass "
                        "another --output_dir")
    foreign = foreign_files(path)
    if foreign:
        raise UserError(f"--output_dir {path} holds files this project did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}): pass a new or empty folder, so nothing of yours "
                        "is overwritten")
    if (path / "metrics.json").exists() and not config.overwrite_output_dir:
        raise UserError(f"{path} already holds a finished run: pass --overwrite_output_dir true or another "
                        "--output_dir")
    if not config.overwrite_output_dir and resume is None and get_last_checkpoint(str(path)) is not None:
        raise UserError(f"{path} holds checkpoints of an unfinished run: pass --resume_from_checkpoint true to "
                        "continue it, or --overwrite_output_dir true to start over")
    remove_staging(path)
    if resume is None:
        _log_fresh_start(config, path)


# Everything a run (and the notebook beside it) writes into its folder; anything else is the user's.
RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "run_config.json", "split.json",
             "log_history.json", "generations.json", "metrics.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "added_tokens.json",
             "categories.png", "lengths.png", "loss_mask.png", "loss_mask_conversation.png", "loss_curves.png",
             "comparison.png", "timings.png"}
RUN_DIRS = {"runs"}  # TensorBoard's event files (`--report_to tensorboard`: transformers' output_dir/runs/DATE_HOST)


CARDS = ("tinyllama_ft", "It has been trained using [TRL]")  # our card; the one TRL writes at each checkpoint


def foreign_files(path: Path) -> list[str]:
    """Names in `path` this project does not write: neither a run's files, its `checkpoint-N` folders, TensorBoard's
    `runs/` nor staging leftovers; a README.md counts as ours only when it is a card of this project."""
    foreign = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name.startswith(".tmp-") or (entry.is_dir() and (name.startswith("checkpoint-") or name in RUN_DIRS)):
            continue
        if name == "README.md" and any(mark in entry.read_text(encoding="utf-8", errors="replace") for mark in CARDS):
            continue
        if name not in RUN_FILES or name == "README.md" or entry.is_dir():
            foreign.append(name)
    return foreign


def is_finished_run(path: Path) -> bool:
    return (Path(path) / "metrics.json").is_file() and (Path(path) / "adapter_model.safetensors").is_file()


def replaces_a_run(config) -> bool:
    """`--overwrite_output_dir true` over a run (finished, or with checkpoints): written beside it, swapped in."""
    path = Path(config.output_dir)
    return bool(config.overwrite_output_dir and path.is_dir()
                and ((path / "metrics.json").exists() or get_last_checkpoint(str(path)) is not None))


def training_folder(config) -> Path:
    """Where this run writes: `output_dir`, or, when it replaces a run there, a hidden sibling (cleared of
    a replacement that never finished) that `finish_run` swaps in once the new run is complete."""
    if not replaces_a_run(config):
        return Path(config.output_dir)
    new, _ = replacement_paths(Path(config.output_dir))
    if _main_process() and new.exists():
        log.info("removing %s, left by a replacement that did not finish", new)
        shutil.rmtree(new)
    log.info("the run in %s stays as it is until this one is complete, then is replaced", config.output_dir)
    return new


def finish_run(config, folder: Path) -> None:
    """The complete run in `folder` becomes `output_dir` (when it was written beside the run it replaces)."""
    out = Path(config.output_dir)
    if Path(folder) != out and _main_process():
        swap_in(Path(folder), out)


def meet_when_saved(trainer) -> None:
    """Every process of a multi-process run waits here until the main one has written the run folder, so that
    `train` returns on no process before the run is complete. It also keeps a process from exiting while its
    collective library still holds the last tensors of its final collective: with ZeRO-3 on gloo, a worker
    thread that frees one after Python began to shut down aborts the process ("terminate called without an
    active exception")."""
    trainer.accelerator.wait_for_everyone()


def _log_fresh_start(config, path: Path) -> None:
    if str(config.resume_from_checkpoint).lower() in RESUME_NEWEST:
        log.info("no checkpoint in %s yet: starting from the beginning", path)


def remove_staging(path: Path) -> None:
    """Remove what a stopped save leaves (`.tmp-checkpoint-N`, `.tmp-final`): never part of a run.
    Only the main process removes, so that no process deletes what another is writing."""
    if not _main_process():
        return
    for leftover in path.glob(".tmp-*"):
        log.info("removing %s, left by a save that did not finish", leftover)
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resume_path(args) -> str | None:
    """`--resume_from_checkpoint true` means the newest complete checkpoint in `output_dir`, or None
    (start from the beginning) when there is none yet; a path must be a checkpoint folder."""
    value = args.resume_from_checkpoint
    if not wants_resume(value):
        return None
    if str(value).lower() not in RESUME_NEWEST:
        path = Path(value)
        if not path.exists():
            raise UserError(f"checkpoint {value} does not exist: pass a checkpoint-N folder or true")
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"{value} is not a checkpoint (no trainer_state.json): pass a checkpoint-N folder "
                            "of a run, or true for the newest one in --output_dir")
        return _readable_checkpoint(str(value))
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    return _readable_checkpoint(last) if last else None


def _readable_checkpoint(checkpoint: str) -> str:
    state = Path(checkpoint) / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{state} is damaged ({error}): delete {Path(checkpoint).name} to resume from the one "
                        "before it, or start over with --overwrite_output_dir true") from None
    return checkpoint


def restart_hint(config) -> str:
    """What to type after a stop: resume where a complete checkpoint exists, else the same command."""
    if replaces_a_run(config):
        return (f"{config.output_dir} still holds the run it was replacing, unchanged: run the same command "
                "again to replace it")
    last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
    if last is not None:
        return f"run the same command with --resume_from_checkpoint true to continue from {Path(last).name}"
    return "no checkpoint was written yet: run the same command again"


def save_run(config, model, tokenizer, metrics: dict, split: dict, log_history: list, generations: dict,
             trainer=None, folder: str | Path | None = None) -> Path:
    """Adapter, tokenizer (with chat template), resolved config, split, log history, generations and
    metrics into `config.output_dir`. Files are written to a hidden folder inside it and moved in,
    `metrics.json` last, so a folder with `metrics.json` is always complete.

    With `trainer`, the adapter is written by `trainer.save_model`, which gathers adapters that
    FSDP or DeepSpeed ZeRO-3 shard: then call this on every process; only the main one writes."""
    out = Path(folder or config.output_dir)  # `training_folder(config)`: output_dir or its replacement
    staging = out / ".tmp-final"
    if trainer is not None:
        trainer.save_model(str(staging))  # a collective under ZeRO-3 / FSDP
        if not trainer.is_world_process_zero():
            return out
    else:
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; run_config.json says the same
    tokenizer.save_pretrained(staging)
    for name, data in (("run_config.json", recorded(json.loads(config.to_json()))), ("split.json", split),
                       ("log_history.json", log_history), ("generations.json", generations),
                       ("metrics.json", metrics)):
        write_json(staging / name, data)
    write_card(staging, json.loads(config.to_json()), metrics, tokenizer)  # replaces PEFT's empty template
    for name in sorted(os.listdir(staging), key=lambda n: n == "metrics.json"):
        if (staging / name).is_file():
            os.chmod(staging / name, 0o644)  # safetensors writes 0600; the folder is meant to be shared
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        move(staging / name, out / name)
    staging.rmdir()
    return out


class StagedCheckpoints:
    """For a transformers Trainer (SFT's and DPO's): a checkpoint appears only when complete (written to
    `.tmp-checkpoint-N`, then renamed), holding what defines its run (`fingerprint`, compared on resume) and the
    run's settings (`run_config`, so that a checkpoint is used like a run folder)."""

    fingerprint: dict | None = None
    run_config: dict | None = None

    def _save_checkpoint(self, model, trial):
        from transformers.trainer import rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, f".tmp-{name}")
        self._get_output_dir = lambda trial=None: staging  # where the parent class writes
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            for file, data in ((FINGERPRINT_FILE, self.fingerprint), ("run_config.json", self.run_config)):
                if data is not None:
                    write_json(Path(staging) / name / file, data)
            (Path(staging) / name / "training_args.bin").unlink(missing_ok=True)  # a pickle of the paths as given
            move(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
