"""The same model in every consumer's OWN chat path (issue 18): from the exported artifacts alone, each consumer
renders the chat template and tokenizes the prompt its own way, and must get exactly `encode_prompt`'s ids (one
BOS, never two) and answer greedily as `generate` does, stopping at the same EOS.

* (a) transformers on a merged export: `apply_chat_template` of the saved tokenizer and `pipeline("text-generation")`;
* (b) llama-cpp-python: `Llama.create_chat_completion` and `python -m llama_cpp.server` (queried with the openai
  client), both with the template taken from the GGUF's metadata;
* (c) llama.cpp's own `llama-server --jinja` (`scripts/build_llama_server.sh`): `/apply-template`, `/tokenize`,
  `/v1/chat/completions`, and its stderr for the double-BOS warning;
* (d) Ollama's template path: the Modelfile's TEMPLATE rendered by Go's text/template as Ollama's server does
  (`tests/ollama_template/main.go`), tokenized as Ollama's llama.cpp runner does (add_special, parse_special).

Prompt ids are checked with the real TinyLlama tokenizer on all 1,109 real Dolly rows, each as three
conversations (the user turn alone, after a system turn, and as the second turn after the previous row's
exchange); answers with the fine-tuned stories260k (`runs.consumer_exports`). Numbers are printed (`pytest -s`)
and in docs/EXPORT.md.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tinyllama_ft import encode_example, encode_prompt, generate, load_tokenizer, to_example
from tinyllama_ft.data import find_special_text
from tinyllama_ft.gguf_export import find_tokenizer_model, modelfile_text, write_gguf

from conftest import ROOT, asset
from runs import ANSWER_TOKENS, consumer_exports, consumer_prompts

SYSTEM = "You are a concise assistant."
LLAMA_SERVER = Path(os.environ.get("LLAMA_SERVER", ROOT / ".cache" / "llama-server" / "0.3.36" / "llama-server"))
DOUBLE_BOS = "starts with 2 BOS tokens"


# --- shared: conversations, the TinyLlama tokenizer as a merged export saves it, and its GGUF -------------------

def conversations(rows, tokenizer) -> list[list[dict]]:
    """Every row without special-token text as three conversations: alone, after a system turn, and after the
    previous row's user turn and answer (two user turns)."""
    usable = [r for r in rows if find_special_text(r["instruction"] + r["context"] + r["response"], tokenizer) is None]
    out, previous = [], None
    for row in usable:
        example = to_example(row)
        out += [example["prompt"], [{"role": "system", "content": SYSTEM}, *example["prompt"]]]
        if previous is not None:
            out.append([*previous["prompt"], *previous["completion"], *example["prompt"]])
        previous = example
    return out


@pytest.fixture(scope="module")
def tinyllama(tmp_path_factory, dolly_rows):
    """The real TinyLlama tokenizer saved as a run or merged export saves it, the 1,109 rows' conversations,
    and a GGUF with this vocabulary and tiny random weights (llama-server and the chat handlers need a model;
    the ids do not depend on the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = str(asset("tinyllama-tokenizer"))
    tokenizer = load_tokenizer(source)
    folder = tmp_path_factory.mktemp("tinyllama")
    tokenizer.save_pretrained(folder / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    gguf = write_gguf(model, tokenizer, folder / "tinyllama-random.gguf",
                      spm_dir=find_tokenizer_model(source, source, tokenizer), name="tinyllama-random")
    convs = conversations(dolly_rows, tokenizer)
    return dict(tokenizer=tokenizer, saved=str(folder / "tokenizer"), model=model, gguf=gguf, conversations=convs,
                ids=[encode_prompt(tokenizer, m) for m in convs])


def llama_cpp_module():
    if os.environ.get("REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                               "llama-cpp-python==0.3.36 builds llama.cpp from source)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log: Path, deadline_s: float = 300) -> None:
    """Poll `url` until it answers 200 (the server has loaded its model) or the process exits."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {deadline_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def answers_agree(got: list[tuple[str, bool]], expected: list[dict]) -> tuple[int, int]:
    """(answers with generate's text and stop, how many of generate's answers ended with EOS)."""
    same = sum(text.strip() == e["text"] and ended == e["ended"] for (text, ended), e in zip(got, expected))
    return same, sum(e["ended"] for e in expected)


# --- the ids training used are unchanged ------------------------------------------------------------------------

def test_the_saved_template_writes_the_bos_and_keeps_every_id_training_used(tinyllama, dolly_rows):
    """TinyLlama-Chat's own template (no BOS; encode_prompt added it) against the saved one (it writes the BOS):
    the same prompt ids and the same training ids and labels on every real row."""
    import copy

    tokenizer = tinyllama["tokenizer"]
    stock = copy.deepcopy(tokenizer)
    stock.chat_template = tokenizer.chat_template.removeprefix("{{ bos_token }}{{ ' ' }}")
    assert stock.chat_template != tokenizer.chat_template and "bos_token" not in stock.chat_template
    for messages, ids in zip(tinyllama["conversations"], tinyllama["ids"]):
        stock_ids = stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
        assert ids == [tokenizer.bos_token_id, *stock_ids] == encode_prompt(stock, messages)
        assert ids.count(tokenizer.bos_token_id) == 1
    rows = [r for r in dolly_rows if find_special_text(r["instruction"] + r["context"] + r["response"], tokenizer)
            is None]
    assert all(encode_example(tokenizer, to_example(r)) == encode_example(stock, to_example(r)) for r in rows)
    print(f"TinyLlama tokenizer: {len(tinyllama['ids'])} prompts of {len(rows)} real rows (of {len(dolly_rows)}), "
          "ids with the saved template = today's; training ids and labels identical")
    assert len(rows) == len(dolly_rows) == 1109


# --- (a) transformers -----------------------------------------------------------------------------------------

def test_transformers_reads_encode_prompts_ids_from_the_saved_files(tinyllama):
    """The saved tokenizer alone (AutoTokenizer) and the real pipeline's own preprocessing, on every conversation."""
    from transformers import AutoTokenizer, pipeline
    from transformers.utils.chat_template_utils import Chat

    saved = AutoTokenizer.from_pretrained(tinyllama["saved"])
    pipe = pipeline("text-generation", model=tinyllama["model"], tokenizer=saved, device="cpu")
    same_template = same_pipeline = 0
    for messages, ids in zip(tinyllama["conversations"], tinyllama["ids"]):
        same_template += saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"] == ids
        same_pipeline += pipe.preprocess(Chat(messages))["input_ids"][0].tolist() == ids
    n = len(ids)
    print(f"transformers: apply_chat_template {same_template}/{len(tinyllama['ids'])}, pipeline "
          f"{same_pipeline}/{len(tinyllama['ids'])} prompts with encode_prompt's ids")
    assert same_template == same_pipeline == len(tinyllama["ids"]) > 3000 and n > 1


@pytest.mark.slow
def test_pipeline_on_the_merged_export_answers_like_generate_with_no_generation_arguments():
    from transformers import pipeline

    exports = consumer_exports()
    pipe = pipeline("text-generation", model=str(exports["merged"]), device="cpu")
    config = json.loads((exports["merged"] / "generation_config.json").read_text())
    assert config["do_sample"] is False and config["eos_token_id"] == 2 and config["max_new_tokens"] > 0
    prompts, expected = consumer_prompts(), exports["generated"]
    got = []
    for messages in prompts:
        out = pipe(messages, max_new_tokens=ANSWER_TOKENS, return_tensors=True)[0]["generated_token_ids"]
        new = out[len(encode_prompt(pipe.tokenizer, messages)):]
        ended = pipe.tokenizer.eos_token_id in new
        got.append((pipe.tokenizer.decode(new[:new.index(2)] if ended else new, skip_special_tokens=True), ended))
    default = pipe(prompts[0])[0]["generated_text"][-1]["content"]  # no arguments at all: greedy, the file's budget
    same, stopped = answers_agree(got, expected)
    print(f"pipeline on the merged export: {same}/{len(prompts)} greedy answers equal to generate's "
          f"({stopped} of them stop at EOS)")
    assert same == len(prompts) and 0 < stopped < len(prompts)
    assert default.strip() == generate(*exports["model"], prompts[0], max_new_tokens=config["max_new_tokens"],
                                       progress=False)["text"]
