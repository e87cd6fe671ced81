"""Run `tinyllama_ft.training.sft.train` under torchrun and record, per process, which training rows its
batches held: `torchrun --nproc_per_node 2 tests/ddp_probe.py --preset smoke --output_dir D ...`."""

import importlib
import json
import os
import sys

from tinyllama_ft import parse_config
from tinyllama_ft.cli import setup_process

pipeline = importlib.import_module("tinyllama_ft.training.sft")
build_trainer, seen = pipeline.build_trainer, []


def build_and_record(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    collate = trainer.data_collator

    def recording(examples):
        seen.extend(json.dumps(e["input_ids"]) for e in examples)
        return collate(examples)

    trainer.data_collator = recording
    return trainer


pipeline.build_trainer = build_and_record
setup_process()
config = parse_config(sys.argv[1:])
pipeline.train(config)
complete = os.path.isfile(os.path.join(config.output_dir, "metrics.json"))  # what this process saw on return
with open(os.path.join(config.output_dir, f"seen-rank{os.environ['RANK']}.json"), "w", encoding="utf-8") as file:
    json.dump(seen, file)
with open(os.path.join(config.output_dir, f"returned-rank{os.environ['RANK']}.json"), "w", encoding="utf-8") as file:
    json.dump({"run_complete": complete}, file)
