"""Run by tests/test_memory.py in a fresh process: decide `gradient_checkpointing="auto"` on stories260k and
real Dolly rows under an address-space limit (RLIMIT_AS) `room` bytes above what the process uses, then lift
the limit, build the trainer and report what was decided and what the trainer's model does.

argv: stories260k folder, Dolly file, then one room per decision: a multiple of the measured activations
("x4") or "none" (no limit). Prints one JSON list, a decision per room."""

import json
import resource
import sys

import psutil

from tinyllama_ft.settings.config import parse_config
from tinyllama_ft.settings.memory import activation_bytes, decide_checkpointing, worst_case_batch, worst_case_rows
from tinyllama_ft.model.loading import load_tokenizer
from tinyllama_ft.training.sft import build_trainer, prepare_data, setup_model

model_dir, dolly, *rooms = sys.argv[1:]
config = parse_config([], model_name_or_path=model_dir, dataset_name=dolly, output_dir="unused", train_size=32,
                      eval_size=0, test_size=0, num_generate=0, eval_strategy="no", max_length=512,
                      per_device_train_batch_size=4, precision="fp32", use_cpu=True, report_to="none",
                      tokenization_cache=False)
tokenizer = load_tokenizer(model_dir)
data = prepare_data(config, tokenizer)
model = setup_model(config, tokenizer)
rows = worst_case_rows(data.examples("train"), 4, False, 512)
need = activation_bytes(model, worst_case_batch(rows, True, tokenizer.pad_token_id, "cpu"))
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
report = []
for room in rooms:
    config.gradient_checkpointing = config.activation_checkpointing = "auto"
    if room != "none":
        resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + int(float(room[1:]) * need), hard))
    try:
        decision = decide_checkpointing(config, model, data, tokenizer.pad_token_id)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    trainer = build_trainer(config, model, tokenizer, data)  # "auto" is already resolved: it keeps the decision
    report.append({"room": room, "need": need, "decision": decision, "config": config.gradient_checkpointing,
                   "trainer_args": trainer.args.activation_checkpointing})
print(json.dumps(report))
