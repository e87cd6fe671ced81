"""Fine-tune TinyLlama-1.1B-Chat on databricks-dolly-15k with LoRA, correctly.

Stages, in the order the notebook calls them::

    config = parse_config(preset="smoke")          # or parse_config([...flags...])
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)         # validate, encode, drop over-long rows, split
    model = setup_model(config)                    # base in compute dtype + LoRA (fp32)
    trainer = build_trainer(config, model, tokenizer, data)
    base = evaluate_base(config, model, tokenizer, data)
    train_metrics = fit(trainer)
    tuned = evaluate_model(config, model, tokenizer, data)
    save_run(...)                                  # or simply: train(config)
    model, tokenizer = load_for_inference(config.output_dir)
    generate(model, tokenizer, "Name three primes.")
"""

from .artifacts import export_merged, load_for_inference, save_run
from .config import Config, notebook_config, parse_config
from .data import encode_example, encode_prompt, format_user_turn, load_rows, to_example
from .errors import UserError
from .evaluate import evaluate_loss, generate, score_generations
from .modeling import load_model, load_tokenizer, wrap_lora
from .train import build_trainer, evaluate_base, evaluate_model, fit, prepare_data, setup_model, summarize, train

__all__ = [
    "Config", "UserError", "build_trainer", "encode_example", "encode_prompt", "evaluate_base", "evaluate_loss",
    "evaluate_model", "export_merged", "fit", "format_user_turn", "generate", "load_for_inference", "load_model",
    "load_rows", "load_tokenizer", "notebook_config", "parse_config", "prepare_data", "save_run", "score_generations", "setup_model",
    "summarize", "to_example", "train", "wrap_lora",
]
