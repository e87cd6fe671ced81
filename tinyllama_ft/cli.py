"""`python -m tinyllama_ft {config,preview,train,dpo,generate,chat,serve,export,evaluate,bench,doctor}`: every error is one
line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .errors import ArgParser, UserError, as_os_error, os_error_line
from .settings.console import make_streams_safe, setup_console
from .storage.files import check_out_file, write_text_file

USAGE = """python -m tinyllama_ft COMMAND [options]

commands:
  config    [--config F.yaml] [--name value ...]   print the resolved configuration (JSON)
  preview   --model_name_or_path M --dataset_name D [--n N] [--out F.jsonl]
            [--dataset_format F] [--columns a=b,...] [--system_prompt TEXT]
                                                  write exactly what the trainer is fed
  train     [--config F.yaml] [--preset smoke] [--name value ...]
                                                  fine-tune, evaluate and save a run folder
  dpo       --adapter RUN [--dataset_name D] [--output_dir OUT] [--beta B] [--preset smoke] [--name value ...]
                                                  preference-tune a finished SFT run (TRL DPOTrainer)
  generate  --adapter DIR --instruction TEXT [--context TEXT] [--max_new_tokens N] [--system_prompt TEXT]
  chat      --adapter DIR [--max_new_tokens N] [--temperature T] [--top_p P] [--system TEXT]
                                                  talk to a run or a merged export, streamed
  serve     --adapter DIR [--host 127.0.0.1] [--port 8000] [--max_new_tokens N] [--request_timeout S]
            [--continuous_batching true|false]
                                                  OpenAI-compatible /v1/chat/completions
  export    --adapter DIR --out DIR [--push_to_hub REPO_ID]
                                                  merge the adapter into a standalone model
            [--format gguf [--quantization f16|q8_0|f32]]  or one .gguf + Ollama Modelfile
  evaluate  --adapter DIR [--tasks T1,T2,...] [--include_path DIR] [--limit N] [--batch_size B|auto]
            [--apply_chat_template] [--out F.json]
                                                  base vs fine-tuned on lm-eval benchmarks (needs
                                                  lm-eval; default: TinyLlama's EVAL.md set)
  bench     --preset cpu|gpu [--repeat N] [--out F.json]
                                                  seed configuration vs default, side by side
  doctor                                          what this machine can do (torch build, GPU, bf16, versions,
                                                  disk, hub), with the fix for what is missing; alias: env

`python -m tinyllama_ft config --help` lists every configuration field. Add --debug for tracebacks,
--verbose for every library warning and the full configuration (known noise is silenced by default)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    make_streams_safe()  # before the first print: any text, any console
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"config": cmd_config, "preview": cmd_preview, "train": cmd_train, "dpo": cmd_dpo,
                "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "export": cmd_export,
                "evaluate": cmd_evaluate, "bench": cmd_bench, "doctor": cmd_doctor, "env": cmd_doctor}
    if command not in commands:
        print(f"error: unknown command {command!r}; run `python -m tinyllama_ft --help`", file=sys.stderr)
        return 2
    setup_process(verbose)
    try:
        commands[command](rest)
    except UserError as error:
        if debug:
            raise
        close_progress_bars()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk, a read-only folder, ...: one line, with what is still intact
        if debug or as_os_error(error) is None:
            raise
        close_progress_bars()
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        close_progress_bars()
        print(f"interrupted: {stop.args[0] if stop.args else 'run the same command again'}", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return 0


def close_progress_bars() -> None:
    """Close the bars a stopped stage left open: an open tqdm bar redraws itself when the interpreter exits,
    after our last line, which is then no longer the last thing the user sees."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def close_process_group() -> None:
    """End a multi-process run's process group (its communicators), on every way out. That the processes
    have finished their collectives first is `meet_when_saved`'s job, at the end of every run."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


STOP_SIGNALS = ("SIGTERM", "SIGBREAK")  # handled like Ctrl-C (SIGINT, which Python turns into KeyboardInterrupt)


def setup_process(verbose: bool = False) -> None:
    """The console (`settings/console.py`: the log format, the known noise silenced unless `verbose`; only the
    main process of a multi-process run talks) and the stop signals: `kill` (SIGTERM) and, on Windows, Ctrl-Break
    (SIGBREAK; Windows sends no SIGTERM) stop like Ctrl-C: the last checkpoint stays usable and the restart hint
    is printed."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):  # SIGBREAK exists only on Windows
            signal.signal(getattr(signal, name), _interrupt)
    setup_console(verbose)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_config(args: list[str]) -> None:
    from .settings.config import parse_config

    print(parse_config(args).to_json())


def cmd_train(args: list[str]) -> None:
    from .settings.config import parse_config
    from .storage.run_folder import restart_hint
    from .training.sft import train

    config = parse_config(args)
    try:
        train(config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(restart_hint(config)) from None


def cmd_dpo(args: list[str]) -> None:
    from .storage.run_folder import restart_hint
    from .training.dpo import parse_dpo_config, train_dpo

    config = parse_dpo_config(args)
    try:
        train_dpo(config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(restart_hint(config)) from None


def cmd_preview(args: list[str]) -> None:
    parser = _parser("preview")
    parser.add_argument("--model_name_or_path", required=True, help="tokenizer source (no weights needed)")
    parser.add_argument("--dataset_name", required=True)
    for name in ("dataset_format", "columns", "dataset_config", "dataset_split", "system_prompt"):
        parser.add_argument(f"--{name}", help="as for train (see `config --help`)")
    parser.add_argument("--n", type=int, default=5, help="first N rows of the file")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--out", help="write JSON lines here instead of stdout")
    opts = _parse(parser, args)
    if opts.out:
        check_out_file(Path(opts.out))
    if opts.n <= 0:
        raise UserError(f"--n must be > 0, got {opts.n}: the number of rows to show")
    if opts.max_length < 16:
        raise UserError(f"--max_length must be an integer >= 16, got {opts.max_length}")
    from .data.prepare import exclusion_counts
    from .data.encoding import check_system_prompt, encode_rows
    from .data.formats import load_rows, parse_columns, to_conversations
    from .model.loading import load_tokenizer

    columns, system_prompt = parse_columns(opts.columns), (opts.system_prompt or "").strip() or None
    dataset_format = opts.dataset_format or "auto"
    rows = load_rows(opts.dataset_name, opts.dataset_config, opts.dataset_split or "train", columns,
                     dataset_format)[: opts.n]
    tokenizer = load_tokenizer(opts.model_name_or_path)
    check_system_prompt(system_prompt, tokenizer)
    conversations = to_conversations(rows, dataset_format, system_prompt)
    encoded, excluded, _ = encode_rows(tokenizer, conversations, opts.max_length)
    lines = [json.dumps({"row": i, **encoded[i]}) for i in sorted(encoded)]
    if opts.out:
        write_text_file(Path(opts.out), "".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))
    for index, why in excluded.items():
        print(f"excluded row {index}: {why}", file=sys.stderr)
    if excluded:
        counts = ", ".join(f"{n} {kind}" for kind, n in exclusion_counts(excluded).items())
        print(f"excluded {len(excluded)} of {len(rows)} rows: {counts}", file=sys.stderr)


def cmd_generate(args: list[str]) -> None:
    parser = _parser("generate")
    parser.add_argument("--adapter", required=True, help="output folder of a finished run")
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--context", default="")
    parser.add_argument("--max_new_tokens", help="default 256; never more than the context leaves after the prompt")
    parser.add_argument("--system_prompt", help="default: the run's own (run_config.json); \"\" for none")
    opts = _parse(parser, args)
    if not opts.instruction.strip():
        raise UserError("--instruction is empty: pass the text to respond to")
    from .settings.generation import generation_settings

    settings = generation_settings({"max_new_tokens": opts.max_new_tokens})
    from .data.encoding import encode_prompt
    from .data.formats import prompt_messages
    from .model.generation import context_length, generate, new_token_budget
    from .storage.saved_model import load_saved, saved_system_prompt

    system_prompt = saved_system_prompt(opts.adapter) if opts.system_prompt is None else opts.system_prompt.strip()
    model, tokenizer = load_saved(opts.adapter)
    prompt = encode_prompt(tokenizer, prompt_messages(opts.instruction, opts.context, system_prompt))
    budget = new_token_budget(model, [prompt], settings.max_new_tokens)
    if budget < settings.max_new_tokens:
        print(f"(max_new_tokens capped at {budget}: the prompt's {len(prompt)} tokens leave {budget} of the model's "
              f"{context_length(model)} positions)", file=sys.stderr)
    print(generate(model, tokenizer, opts.instruction, opts.context, budget, progress=False,
                   system_prompt=system_prompt)["text"])


def cmd_chat(args: list[str]) -> None:
    parser = _parser("chat")
    parser.add_argument("--adapter", required=True, help="a run folder or a merged export")
    parser.add_argument("--max_new_tokens", help="default 256")
    parser.add_argument("--temperature", help="0: greedy (the default); at most 2")
    parser.add_argument("--top_p", help="in (0, 1], default 1")
    parser.add_argument("--system", "--system_prompt", dest="system",
                        help="system message; default: the run's system_prompt, if any; \"\" for none")
    opts = _parse(parser, args)
    from .settings.generation import generation_settings

    settings = generation_settings({"max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature,
                                    "top_p": opts.top_p})
    from .inference.chat import main as chat_main

    system = None if opts.system is None else opts.system.strip()
    chat_main(opts.adapter, settings.max_new_tokens, settings.temperature, settings.top_p, system)


def _on_off(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() in ("true", "1", "yes", "on")


def cmd_serve(args: list[str]) -> None:
    parser = _parser("serve")
    parser.add_argument("--adapter", required=True, help="a run folder or a merged export")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_new_tokens", type=int, default=1024,
                        help="the most tokens an answer gets (and never more than the context leaves)")
    parser.add_argument("--request_timeout", type=float, default=300.0, help="seconds a request may generate")
    parser.add_argument("--continuous_batching", type=_on_off, nargs="?", const=True, default=True,
                        metavar="true|false", help="let requests that arrive together share the model's steps "
                        "(transformers' continuous batching; a request with its own sampling settings runs on its "
                        "own); false: one request after another (default: true)")
    opts = _parse(parser, args)
    from .inference.serve import serve

    serve(opts.adapter, opts.host, opts.port, opts.max_new_tokens, opts.request_timeout, opts.continuous_batching)


def cmd_export(args: list[str]) -> None:
    parser = _parser("export")
    parser.add_argument("--adapter", required=True, help="output folder of a finished run")
    parser.add_argument("--out", required=True, help="new folder for the merged model")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload it to this (private) hub repo")
    parser.add_argument("--format", choices=("safetensors", "gguf", "gguf-adapter"), default="safetensors",
                        help="safetensors: a transformers folder; gguf: one .gguf and an Ollama Modelfile; "
                        "gguf-adapter: the base model's .gguf and the LoRA adapter's (llama.cpp --lora)")
    parser.add_argument("--quantization", choices=("f16", "q8_0", "f32"), help="GGUF weights (default f16; f32: exact)")
    opts = _parse(parser, args)
    from .export.merged import export_merged, push_to_hub

    if opts.quantization and not opts.format.startswith("gguf"):
        raise UserError("--quantization applies to GGUF files: add --format gguf")
    if opts.format == "gguf":
        from .export.gguf import export_gguf

        print(export_gguf(opts.adapter, opts.out, opts.quantization or "f16"))
    elif opts.format == "gguf-adapter":
        from .export.gguf_adapter import export_gguf_adapter

        print(export_gguf_adapter(opts.adapter, opts.out, opts.quantization or "f16"))
    else:
        print(export_merged(opts.adapter, opts.out))
    if opts.push_to_hub:
        print(push_to_hub(opts.out, opts.push_to_hub), file=sys.stderr)


def cmd_evaluate(args: list[str]) -> None:
    """lm-evaluation-harness on the base and the fine-tuned model (`evaluation/harness.py`; the Dolly evaluation
    that `train` runs is `evaluation/dolly.py`)."""
    from .evaluation.harness import (DEFAULT_TASKS, evaluate_saved, format_table, parse_tasks, require_lm_eval,
                                     results_path, update_card, write_results)

    parser = _parser("evaluate")
    parser.add_argument("--adapter", required=True, help="a run folder, a checkpoint-N folder or a merged export")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="lm-eval task names, comma-separated (default: TinyLlama's EVAL.md set; offline: dolly_mc)")
    parser.add_argument("--include_path", help="a folder of your own lm-eval task YAML files")
    parser.add_argument("--limit", type=int, help="only the first N rows of each task (a quick look)")
    parser.add_argument("--batch_size", help="rows a forward pass, or auto (default: auto on a GPU, 8 on the CPU)")
    parser.add_argument("--apply_chat_template", action="store_true",
                        help="render prompts with the model's chat template (for generative tasks)")
    parser.add_argument("--out", help="results JSON (default: DIR/lm_eval.json; a .md table and .png chart beside)")
    opts = _parse(parser, args)
    require_lm_eval()
    if opts.limit is not None and opts.limit <= 0:
        raise UserError(f"--limit must be > 0, got {opts.limit}: the number of rows of each task")
    batch_size = opts.batch_size
    if batch_size is not None and batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise UserError(f"--batch_size must be a whole number > 0 or auto, got {batch_size!r}")
    from .storage.saved_model import check_saved_folder

    check_saved_folder(Path(opts.adapter))  # first: without --out, the results go into it
    out = results_path(opts.adapter, opts.out)
    results = evaluate_saved(opts.adapter, parse_tasks(opts.tasks), opts.include_path, opts.limit,
                             int(batch_size) if batch_size and batch_size.isdigit() else batch_size,
                             opts.apply_chat_template)
    paths = write_results(results, out)
    print(format_table(results))  # base vs fine-tuned, as the card shows it
    for path in paths:
        print(path)
    if out == Path(opts.adapter) / "lm_eval.json" and update_card(opts.adapter):
        print(Path(opts.adapter) / "README.md")


def cmd_bench(args: list[str]) -> None:
    from .bench.compare import main as bench_main

    bench_main(args)


def cmd_doctor(args: list[str]) -> None:
    from .settings.doctor import main as doctor_main

    _parse(_parser("doctor"), args)
    doctor_main()


def _parser(command: str) -> argparse.ArgumentParser:
    return ArgParser(prog=f"python -m tinyllama_ft {command}")


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    return parser.parse_args(args)
