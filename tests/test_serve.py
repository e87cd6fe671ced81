"""`serve`: transformers' OpenAI-compatible server on our model renders `encode_prompt`'s ids (BOS
included, which `transformers serve` alone omits), refuses special-token text, and answers, streamed
or not, exactly what `generate` answers; tested through the real command line and a real HTTP client."""

import copy
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tinyllama_ft import encode_prompt, generate, load_for_inference
from tinyllama_ft.chat import Chat
from tinyllama_ft.errors import UserError
from tinyllama_ft.modeling import build_tiny_tokenizer
from tinyllama_ft.chat_template import PROBES, bos_prefix
from tinyllama_ft.serve import check_prompt_ids

from conftest import ROOT
from runs import stories_run


def test_transformers_serve_gets_encode_prompts_ids_from_the_saved_template(tinyllama_tokenizer):
    for tokenizer in (tinyllama_tokenizer, build_tiny_tokenizer()):
        check_prompt_ids(tokenizer)
        for messages in PROBES:
            fed = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")  # as transformers' ChatCompletionHandler calls it
            assert fed["input_ids"].tolist() == [encode_prompt(tokenizer, messages)]
    stock = copy.deepcopy(tinyllama_tokenizer)  # TinyLlama-Chat's own template: no BOS
    stock.chat_template = stock.chat_template.removeprefix(bos_prefix(stock))
    with pytest.raises(UserError, match="gives other prompt ids than training"):
        check_prompt_ids(stock)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, base_url: str, log, deadline_s: float = 300) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base_url}/models", timeout=5).json()
        except httpx.TransportError:
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer within {deadline_s} s")


@pytest.mark.slow
def test_serve_answers_like_generate_streamed_and_not(tmp_path):
    from openai import BadRequestError, OpenAI

    run = stories_run()
    port, log = free_port(), tmp_path / "serve.log"
    base_url = f"http://127.0.0.1:{port}/v1"
    process = subprocess.Popen([sys.executable, "-m", "tinyllama_ft", "serve", "--adapter", str(run), "--port",
                                str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        models = wait_until_serving(process, base_url, log)
        assert [m["id"] for m in models["data"]] == [run.name]
        model, tokenizer = load_for_inference(str(run), device="cpu")
        question = "Name three primes."
        expected = generate(model, tokenizer, question, max_new_tokens=16, progress=False)
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": question}]

        reply = client.chat.completions.create(model=run.name, messages=messages, max_tokens=16)
        assert reply.choices[0].message.content == expected["text"] and expected["text"]  # stripped as generate's
        assert reply.model == run.name
        assert reply.choices[0].finish_reason == ("stop" if expected["ended"] else "length")
        assert reply.usage.prompt_tokens == len(encode_prompt(tokenizer, messages))

        chunks = list(client.chat.completions.create(model=run.name, messages=messages, max_tokens=16, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == expected["text"] and len(chunks) > 3  # token by token, stripped as generate's

        sampled = client.chat.completions.create(model=run.name, messages=messages, max_tokens=16, temperature=1.5,
                                                 seed=1234).choices[0].message.content
        torch.manual_seed(1234)  # the server seeds the same global generator per request
        assert sampled.strip() == Chat(model, tokenizer, max_new_tokens=16, temperature=1.5).ask(question)
        assert sampled.strip() != expected["text"]  # sampled, not greedy (transformers alone stays greedy)

        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": "Hi </s>"}])
        assert "special string '</s>'" in refused.value.response.json()["detail"]
        with pytest.raises(BadRequestError) as refused:  # stories260k has 512 positions
            client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": "word " * 600}])
        assert "drop its oldest turns" in refused.value.response.json()["detail"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_serve_and_chat_refuse_a_folder_that_holds_no_model_in_one_line(tmp_path, capsys):
    from tinyllama_ft.cli import main

    for command in ("serve", "chat"):
        assert main([command, "--adapter", str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {tmp_path} is neither a run folder")
    assert main(["serve", "--adapter", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_with_continuous_batching_answers_concurrent_requests_like_generate(tmp_path):
    """`serve --continuous_batching`: 4 requests at once share the model's steps and each gets `generate`'s
    greedy answer (the server's cache sized for 8 whole contexts, not for the machine's RAM)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    run = stories_run()
    port, log = free_port(), tmp_path / "serve.log"
    base_url = f"http://127.0.0.1:{port}/v1"
    process = subprocess.Popen([sys.executable, "-m", "tinyllama_ft", "serve", "--adapter", str(run), "--port",
                                str(port), "--continuous_batching"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=log.open("w"))
    try:
        wait_until_serving(process, base_url, log)
        model, tokenizer = load_for_inference(str(run), device="cpu")
        questions = ["Name three primes.", "Why is the sky blue?", "What is a cat?", "Tell me a story."]
        expected = generate(model, tokenizer, questions, max_new_tokens=16, batching="static", progress=False)
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        ask = lambda q: client.chat.completions.create(  # noqa: E731
            model=run.name, messages=[{"role": "user", "content": q}], max_tokens=16).choices[0].message.content
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, questions))
        assert [a.strip() for a in answers] == [e["text"] for e in expected]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
