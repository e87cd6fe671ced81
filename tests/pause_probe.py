"""`python -m tinyllama_ft train ...` that stops at a named point and waits there for a signal, so an
interruption test signals a run known to be at that point (no race with a fast run):

    python tests/pause_probe.py STAGE MARKER train --preset smoke ...

STAGE: `step-N` (optimizer step N done, its checkpoint not yet written), `saving-checkpoint-N`
(checkpoint N written to its staging folder, not yet renamed), `checkpoint-N` (checkpoint N
complete), `base-evaluation`, `final-evaluation`, `final-save` (3 of the final files moved in), `swap`
(a run replacing another: the old one moved aside, the new one not yet in its place).
At that point the probe writes MARKER and sleeps until a signal ends it. Test code only: the package
has no pause hook."""

import importlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package of this checkout

from transformers import TrainerCallback
from trl import SFTTrainer

from tinyllama_ft.evaluation import dolly as evaluate
from tinyllama_ft.storage import run_folder
from tinyllama_ft.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started in a background job
pipeline = importlib.import_module("tinyllama_ft.training.sft")
stage, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]


def pause():
    marker.write_text(stage, encoding="utf-8")
    while True:  # SIGINT / SIGTERM arrive as KeyboardInterrupt here, as in a real run
        time.sleep(0.05)


class PauseAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if stage == f"step-{state.global_step}":
            pause()

    def on_save(self, args, state, control, **kwargs):
        if stage == f"checkpoint-{state.global_step}":
            pause()


build_trainer = pipeline.build_trainer
pipeline.build_trainer = lambda *a, **k: (lambda t: (t.add_callback(PauseAt()), t)[1])(build_trainer(*a, **k))
dpo_stage = importlib.import_module("tinyllama_ft.training.dpo")  # `python tests/pause_probe.py step-N MARKER dpo ...`
build_dpo_trainer = dpo_stage.build_dpo_trainer
dpo_stage.build_dpo_trainer = lambda *a, **k: (lambda t: (t.add_callback(PauseAt()), t)[1])(build_dpo_trainer(*a, **k))

save_checkpoint = SFTTrainer._save_checkpoint


def saving_checkpoint(self, model, trial):
    save_checkpoint(self, model, trial)
    if stage == f"saving-checkpoint-{self.state.global_step}":
        pause()


SFTTrainer._save_checkpoint = saving_checkpoint

evaluate_base, evaluate_model, calls = pipeline.evaluate_base, pipeline.evaluate_model, []


def pausing_base(*args, **kwargs):
    if stage == "base-evaluation":
        pause()
    return evaluate_base(*args, **kwargs)


def pausing_model(*args, **kwargs):
    calls.append(1)
    if stage == "final-evaluation" and len(calls) == 2:  # the first call is the base evaluation's
        pause()
    return evaluate_model(*args, **kwargs)


pipeline.evaluate_base = pausing_base
pipeline.evaluate_model = evaluate.evaluate_model = pausing_model  # evaluate_base calls it too

replace, moved = os.replace, []


def pausing_replace(source, target, *args, **kwargs):
    if stage == "swap" and Path(source).name.endswith(".replacing"):  # the old run moved aside, the new not in
        pause()
    if Path(source).parent.name == ".tmp-final":
        if stage == "final-save" and len(moved) == 3:
            pause()
        moved.append(source)
    return replace(source, target, *args, **kwargs)


run_folder.os.replace = pausing_replace
sys.exit(main(argv))
