"""The model card's "Use it" section: the Python and shell lines that load, chat with, serve, export and run the
model, quoted so that they work when pasted whatever the folder is called: a path with spaces, backslashes or
quotes is one shell word (`shlex.quote`, for the POSIX shells the card shows) and one Python string (`repr`), and
the Ollama model is given a name Ollama accepts (`ollama_name`)."""

from __future__ import annotations

import json
import re
import shlex


def ollama_name(folder_name: str) -> str:
    """A model name Ollama accepts, from a folder's name: lower-case letters, digits, '-', '_' and '.', beginning
    and ending with a letter or digit, at most 80 characters ("my run (v2)" -> "my-run-v2")."""
    name = re.sub(r"[^a-z0-9._-]+", "-", folder_name.lower())[:80].strip("-._")
    return name or "tinyllama-ft"


def usage_section(name: str, run_dir: str, merged_to: str | None) -> str:
    """The section, for the run in `run_dir` or, when `merged_to` names it, its merged export."""
    merged = merged_to is not None
    here = merged_to if merged else run_dir
    load = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
            f'model = AutoModelForCausalLM.from_pretrained({here!r})\n'
            f'tokenizer = AutoTokenizer.from_pretrained({here!r})\n'
            f'# or, with the same prompt code as training:\n'
            f'from tinyllama_ft import load_saved\nmodel, tokenizer = load_saved({here!r})'
            if merged else
            f'from tinyllama_ft import generate, load_saved\n'
            f'model, tokenizer = load_saved({here!r})   # the base model + this adapter\n'
            f'print(generate(model, tokenizer, "Give me three uses of a brick.")["text"])')
    q, model = shlex.quote, ollama_name(name)
    request = json.dumps({"model": model, "messages": [{"role": "user", "content": "Name three primes."}],
                          "max_tokens": 128})
    export = "" if merged else (f"python -m tinyllama_ft export --adapter {q(run_dir)} --out {q(run_dir + '-merged')}"
                                "            # merged safetensors\n")
    shell = [f"python -m tinyllama_ft chat --adapter {q(here)}                       # multi-turn, streamed; /reset, /exit",
             f"python -m tinyllama_ft serve --adapter {q(here)} --port 8000          # OpenAI-compatible API",
             "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
             f"  -d {q(request)}",
             export + f"python -m tinyllama_ft export --adapter {q(run_dir)} --out {q(run_dir + '-gguf')} "
             "--format gguf --quantization q8_0   # llama.cpp / Ollama (from the run folder)",
             f"ollama create {model} -f {q(run_dir + '-gguf/Modelfile')}", f"ollama run {model}"]
    windows = ("" if all(q(path) == path for path in (here, run_dir)) else
               " In PowerShell or cmd.exe, write the quoted paths in double quotes instead.")
    return "\n".join([
        "## Use it", "", "```python", load, "```", "",
        "From the command line, in a checkout of tinyllama-ft (greedy unless `--temperature` is given; the "
        f"prompt is built exactly as in training).{windows}", "", "```bash", *shell, "```"])
