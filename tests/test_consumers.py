"""The same model in every consumer's OWN chat path: from the exported artifacts alone, each consumer
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
from tinyllama_ft.data.encoding import find_special_text
from tinyllama_ft.model.generation import decode_answer
from tinyllama_ft.export.gguf import find_tokenizer_model, modelfile_text, write_gguf

from conftest import ROOT, asset
from runs import ANSWER_TOKENS, consumer_exports, consumer_prompts

SYSTEM = "You are a concise assistant."
LLAMA_SERVER = Path(os.environ.get("LLAMA_SERVER", ROOT / ".cache" / "llama-server" / "0.3.36" / "llama-server"))
DOUBLE_BOS = "starts with 2 BOS tokens"
# The GGUF stores f16 matrices: measured 11/12 greedy answers equal to generate's fp32 ones through both
# llama-cpp-python paths (the 12th parts at its 4th token, "Rosion" for "Rosie": a near tie rounded the other
# way; tests/test_gguf.py shows llama.cpp equal to transformers reading the same f16 file, 12/12).
F16_SLACK = 1
# consumer_exports' runs: "dolly" answers run to the token budget, "stopping" ones end in EOS with a margin
RUNS = pytest.mark.parametrize("run", ["dolly", "stopping"])


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
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text(encoding='utf-8')[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {deadline_s} s:\n{log.read_text(encoding='utf-8')[-3000:]}")


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


def check_answers(consumer: str, run: str, got: list[tuple[str, bool]], expected: list[dict]) -> None:
    """Print how many of `consumer`'s greedy answers equal generate's, and assert it: on the stopping run every
    answer, each ending in EOS where generate's does (most do); on the other up to F16_SLACK near ties apart."""
    same, stopped = answers_agree(got, expected)
    print(f"{consumer}, {run} run: {same}/{len(got)} greedy answers equal to generate's ({stopped} of generate's "
          f"end in EOS); differing: {[(t, e['text']) for (t, _), e in zip(got, expected) if t.strip() != e['text']]}")
    if run == "stopping":
        assert stopped >= len(expected) // 2, "the stopping run should end most answers in EOS"
        assert same == len(got)
    else:
        assert same >= len(got) - F16_SLACK


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
@RUNS
def test_pipeline_on_the_merged_export_answers_like_generate_with_no_generation_arguments(run):
    from transformers import pipeline

    exports = consumer_exports(run)
    pipe = pipeline("text-generation", model=str(exports["merged"]), device="cpu")
    config = json.loads((exports["merged"] / "generation_config.json").read_text(encoding="utf-8"))
    assert config["do_sample"] is False and config["eos_token_id"] == 2 and config["max_new_tokens"] > 0
    prompts, expected = consumer_prompts(), exports["generated"]
    got = []
    for messages in prompts:
        out = pipe(messages, max_new_tokens=ANSWER_TOKENS, return_tensors=True)[0]["generated_token_ids"]
        answer = decode_answer(pipe.tokenizer, out[len(encode_prompt(pipe.tokenizer, messages)):])  # as generate reads
        got.append((answer["text"], answer["ended"]))
    default = pipe(prompts[0])[0]["generated_text"][-1]["content"]  # no arguments at all: greedy, the file's budget
    check_answers("pipeline on the merged export", run, got, expected)
    assert answers_agree(got, expected)[0] == len(prompts)  # no f16 here: the same fp32 weights
    assert default.strip() == generate(*exports["model"], prompts[0], max_new_tokens=config["max_new_tokens"],
                                       progress=False)["text"]


# --- (b) llama-cpp-python ---------------------------------------------------------------------------------------

class _Recorded(Exception):
    pass


def chat_handler_prompt_ids(llm, messages) -> list[int]:
    """The ids llama-cpp-python's own chat handler (the GGUF's template, chosen by `Llama` itself) feeds: its
    `create_chat_completion` runs unchanged up to the call that would evaluate them, which records them instead."""
    seen = {}

    def create_completion(prompt, **kwargs):
        seen["ids"] = list(prompt)
        raise _Recorded

    llm.create_completion = create_completion  # the handler calls llama.create_completion(prompt=ids, ...)
    try:
        llm.create_chat_completion(messages=messages)
    except _Recorded:
        pass
    finally:
        del llm.create_completion
    return seen["ids"]


def test_llama_cpp_chat_handler_feeds_encode_prompts_ids(tinyllama):
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(str(tinyllama["gguf"]), vocab_only=True, verbose=False)
    try:
        assert llm.chat_format == "chat_template.default"  # the template from the file's metadata, no guess
        same = sum(chat_handler_prompt_ids(llm, m) == ids for m, ids in zip(tinyllama["conversations"], tinyllama["ids"]))
    finally:
        llm.close()
    print(f"llama-cpp-python create_chat_completion: {same}/{len(tinyllama['ids'])} prompts with encode_prompt's ids")
    assert same == len(tinyllama["ids"])


@pytest.mark.slow
@RUNS
def test_llama_cpp_create_chat_completion_answers_like_generate(run):
    llama_cpp = llama_cpp_module()
    exports = consumer_exports(run)
    llm = llama_cpp.Llama(str(exports["gguf"]), n_ctx=512, n_threads=1, verbose=False)
    try:
        got = []
        for messages in consumer_prompts():
            # temperature 0: its default is 0.2 (sampling); repeat_penalty is 1.0 by default here
            choice = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=ANSWER_TOKENS)["choices"][0]
            got.append((choice["message"]["content"], choice["finish_reason"] == "stop"))
        prompt_ids = [chat_handler_prompt_ids(llm, m) for m in consumer_prompts()]
    finally:
        llm.close()
    tokenizer = exports["model"][1]
    assert prompt_ids == [encode_prompt(tokenizer, m) for m in consumer_prompts()]
    check_answers("llama-cpp-python create_chat_completion (f16)", run, got, exports["generated"])


@pytest.mark.slow
@RUNS
def test_llama_cpp_server_answers_like_generate_through_the_openai_client(tmp_path, run):
    from openai import OpenAI

    llama_cpp_module()
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extras: pip install 'llama-cpp-python[server]'")
    exports = consumer_exports(run)
    port, log = free_port(), tmp_path / "llama_cpp_server.log"
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(exports["gguf"]), "--n_ctx", "512",
                                "--n_threads", "1", "--port", str(port)], stdout=log.open("w", encoding="utf-8"), stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", process, log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        got, prompt_tokens = [], []
        for messages in consumer_prompts():
            # only the caller can set these: the server samples at 0.8 with repeat_penalty 1.1 by default
            reply = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=ANSWER_TOKENS,
                                                   extra_body={"repeat_penalty": 1.0})
            got.append((reply.choices[0].message.content, reply.choices[0].finish_reason == "stop"))
            prompt_tokens.append(reply.usage.prompt_tokens)
    finally:
        stop(process)
    tokenizer = exports["model"][1]
    assert prompt_tokens == [len(encode_prompt(tokenizer, m)) for m in consumer_prompts()]
    check_answers("python -m llama_cpp.server + openai client", run, got, exports["generated"])
    assert "training context overflow" not in log.read_text(encoding="utf-8")


# --- transformers chat: HF's own terminal client against serve ----------------------------------------------------

@pytest.mark.slow
@RUNS
def test_transformers_chat_against_serve_answers_like_generate_with_its_own_flags(tmp_path, run):
    """`transformers chat MODEL URL max_new_tokens=5 do_sample=False`, typed into from a pipe: it first asks the
    server to load the model (`POST /load_model`, transformers serve's endpoint), sends its flags as the request's
    `generation_config`, and saves the chat with `!save`. Its answer is generate's with the same budget: the flags
    win over serve's own "room the context leaves" default. The client refuses to reach even 127.0.0.1 while
    HF_HUB_OFFLINE=1 is set (huggingface_hub's request hook), so it runs without it."""
    exports = consumer_exports(run)
    messages = next(m for m in consumer_prompts() if len(m) == 1 and "\n" not in m[0]["content"])
    budget = 5
    expected = generate(*exports["model"], messages, max_new_tokens=budget, progress=False)
    name = exports["run"].name
    port, log = free_port(), tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "tinyllama_ft", "serve", "--adapter", str(exports["run"]),
                               "--port", str(port)], cwd=ROOT, stdout=log.open("w", encoding="utf-8"), stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", server, log)
        typed = [messages[0]["content"]] + ([] if expected["ended"] else ["n"]) + ["!save", "!exit"]  # n: no "continue"
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        client = subprocess.run([str(Path(sys.executable).parent / "transformers"), "chat", name,
                                 f"http://127.0.0.1:{port}", f"max_new_tokens={budget}", "do_sample=False",
                                 "--save-folder", str(tmp_path / "saved")], input="\n".join(typed) + "\n",
                                capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    finally:
        stop(server)
    assert client.returncode == 0, client.stdout[-2000:] + client.stderr[-2000:]
    (saved,) = (tmp_path / "saved" / name).glob("chat_*.json")
    chat = json.loads(saved.read_text(encoding="utf-8"))
    assert chat["settings"]["config"]["max_new_tokens"] == budget
    assert chat["chat_history"][0] == messages[0]
    answer = chat["chat_history"][1]["content"]
    print(f"transformers chat, {run} run: {answer!r}; generate: {expected['text']!r} (ended in EOS: {expected['ended']})")
    assert answer.strip() == expected["text"] and len(chat["chat_history"]) == 2


# --- (c) llama.cpp's own llama-server -----------------------------------------------------------------------------

def llama_server_binary() -> Path:
    if LLAMA_SERVER.is_file():
        return LLAMA_SERVER
    if os.environ.get("REQUIRE_LLAMA_SERVER") == "1":
        raise AssertionError(f"{LLAMA_SERVER} is missing: run scripts/build_llama_server.sh")
    pytest.skip(f"llama-server is not built ({LLAMA_SERVER}): scripts/build_llama_server.sh builds it (measured in "
                "docs/EXPORT.md), or set LLAMA_SERVER to a llama-server binary")


class LlamaServer:
    """`llama-server --jinja` on a GGUF, greedy by default only where the request says so."""

    def __init__(self, gguf: Path, log: Path, n_ctx: int):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([str(llama_server_binary()), "-m", str(gguf), "--jinja", "-c", str(n_ctx),
                                         "-t", "1", "-np", "1", "--host", "127.0.0.1", "--port", str(self.port)],
                                        stdout=log.open("w", encoding="utf-8"), stderr=subprocess.STDOUT)

    def __enter__(self):
        wait_for(f"{self.url}/health", self.process, self.log)
        return self

    def __exit__(self, *exc):
        stop(self.process)

    def prompt_ids(self, client: httpx.Client, messages) -> list[int]:
        """What the server feeds for `messages`: its chat template applied (`/apply-template`, the text its chat
        endpoint tokenizes), tokenized as that endpoint does (BOS added as the file says, special tokens parsed)."""
        prompt = client.post(f"{self.url}/apply-template", json={"messages": messages}).json()["prompt"]
        return client.post(f"{self.url}/tokenize", json={"content": prompt, "add_special": True,
                                                         "parse_special": True}).json()["tokens"]


@pytest.mark.slow
def test_llama_server_applies_the_template_to_encode_prompts_ids(tinyllama, tmp_path):
    log = tmp_path / "llama-server.log"
    with LlamaServer(tinyllama["gguf"], log, n_ctx=4096) as server, httpx.Client(timeout=60) as client:
        same = sum(server.prompt_ids(client, m) == ids for m, ids in zip(tinyllama["conversations"], tinyllama["ids"]))
        reply = client.post(f"{server.url}/v1/chat/completions", json={
            "messages": tinyllama["conversations"][1], "max_tokens": 1, "temperature": 0}).json()
    print(f"llama-server --jinja: {same}/{len(tinyllama['ids'])} prompts with encode_prompt's ids")
    assert same == len(tinyllama["ids"])
    assert reply["usage"]["prompt_tokens"] == len(tinyllama["ids"][1])
    assert DOUBLE_BOS not in log.read_text(encoding="utf-8")


@pytest.mark.slow
@RUNS
def test_llama_server_answers_like_generate(tmp_path, run):
    exports = consumer_exports(run)
    tokenizer = exports["model"][1]
    log = tmp_path / "llama-server.log"
    got, prompt_tokens = [], []
    with LlamaServer(exports["gguf"], log, n_ctx=512) as server, httpx.Client(timeout=120) as client:
        for messages in consumer_prompts():
            assert server.prompt_ids(client, messages) == encode_prompt(tokenizer, messages)
            reply = client.post(f"{server.url}/v1/chat/completions", json={
                "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0}).json()
            got.append((reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"] == "stop"))
            prompt_tokens.append(reply["usage"]["prompt_tokens"])
    assert prompt_tokens == [len(encode_prompt(tokenizer, m)) for m in consumer_prompts()]
    check_answers("llama-server --jinja", run, got, exports["generated"])
    assert DOUBLE_BOS not in log.read_text(encoding="utf-8")


# --- (d) Ollama's template path ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ollama_renderer(tmp_path_factory) -> Path:
    """tests/ollama_template/main.go built with the Go toolchain (Debian's golang-go in CI)."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("REQUIRE_GO") == "1":
            raise AssertionError("go is missing: apt-get install golang-go")
        pytest.skip("the Go toolchain is not installed (apt-get install golang-go)")
    out = tmp_path_factory.mktemp("go") / "ollama_template"
    env = {**os.environ, "GOCACHE": str(out.parent / "cache"), "GOPATH": str(out.parent / "gopath"), "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(out), str(ROOT / "tests" / "ollama_template" / "main.go")], check=True,
                   env=env, capture_output=True, timeout=600)
    return out


def render_with_go(renderer: Path, template: str, system: str, convs: list[list[dict]]) -> list[str]:
    request = json.dumps({"template": template, "system": system, "conversations": convs})
    return json.loads(subprocess.run([str(renderer)], input=request, capture_output=True, text=True, check=True,
                                     timeout=300).stdout)


def modelfile_parts(text: str) -> tuple[str, str]:
    import re

    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return template, system.group(1) if system else ""


def test_ollama_template_rendered_by_go_tokenizes_to_encode_prompts_ids(tinyllama, ollama_renderer):
    """What is proved: Go's text/template, given the data Ollama's server builds, renders the Modelfile's
    TEMPLATE into text that llama.cpp's tokenizer (Ollama's default runner for Llama files: add_special and
    parse_special on, the file's add_bos_token) turns into encode_prompt's ids, with the Modelfile's SYSTEM
    used as Ollama uses it. Not proved: Ollama's own binary (its Go code is re-stated in main.go, not run), its
    vendored llama.cpp version, and its Go-engine tokenizer (OLLAMA_NEW_ENGINE=1)."""
    llama_cpp = llama_cpp_module()
    tokenizer, convs, ids = tinyllama["tokenizer"], tinyllama["conversations"], tinyllama["ids"]
    with_system = [encode_prompt(tokenizer, m if m[0]["role"] == "system" else
                                 [{"role": "system", "content": SYSTEM}, *m]) for m in convs]
    llm = llama_cpp.Llama(str(tinyllama["gguf"]), vocab_only=True, verbose=False)
    try:
        add_bos = llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
        results = {}
        for system, expected in (("", ids), (SYSTEM, with_system)):
            template, modelfile_system = modelfile_parts(modelfile_text("m.gguf", 2048, system_prompt=system))
            texts = render_with_go(ollama_renderer, template, modelfile_system, convs)
            results[bool(system)] = sum(llm.tokenize(t.encode(), add_bos=add_bos, special=True) == e
                                        for t, e in zip(texts, expected))
    finally:
        llm.close()
    print(f"Ollama template (Go text/template) + llama.cpp tokenizer: {results[False]}/{len(ids)} prompts with "
          f"encode_prompt's ids, {results[True]}/{len(ids)} with the Modelfile's SYSTEM")
    assert add_bos and results[False] == results[True] == len(ids)
