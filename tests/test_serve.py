"""`serve`: transformers' OpenAI-compatible server on our model renders `encode_prompt`'s ids (BOS
included, which `transformers serve` alone omits), refuses special-token text, and answers, streamed
or not, exactly what `generate` answers; tested through the real command line and a real HTTP client."""

import copy
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tinyllama_ft import encode_prompt, generate, load_for_inference
from tinyllama_ft.inference.chat import Chat
from tinyllama_ft.errors import UserError
from tinyllama_ft.model.loading import build_tiny_tokenizer
from tinyllama_ft.data.chat_template import PROBES, bos_prefix
from tinyllama_ft.inference.serve import check_port_free, check_prompt_ids

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
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text(encoding='utf-8')[-3000:]}")
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
                                str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w", encoding="utf-8"))
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
        assert "special string '</s>'" in refused.value.response.json()["error"]["message"]
        with pytest.raises(BadRequestError) as refused:  # stories260k has 512 positions
            client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": "word " * 600}])
        assert "drop its oldest turns" in refused.value.response.json()["error"]["message"]
        for body, status in BAD_REQUESTS[:6]:  # through the real server too; each followed by a good request
            answer = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120)
            assert answer.status_code == status and answer.json()["error"]["message"], answer.text
            assert client.chat.completions.create(model=run.name, messages=messages, max_tokens=4).choices
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

    from openai import BadRequestError, OpenAI

    run = stories_run()
    port, log = free_port(), tmp_path / "serve.log"
    base_url = f"http://127.0.0.1:{port}/v1"
    process = subprocess.Popen([sys.executable, "-m", "tinyllama_ft", "serve", "--adapter", str(run), "--port",
                                str(port), "--continuous_batching"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=log.open("w", encoding="utf-8"))
    try:
        wait_until_serving(process, base_url, log)
        model, tokenizer = load_for_inference(str(run), device="cpu")
        questions = ["Name three primes.", "Why is the sky blue?", "What is a cat?", "Tell me a story."]
        expected = generate(model, tokenizer, questions, max_new_tokens=16, batching="static", progress=False)
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        # the first request's sampling settings would become every later request's (transformers 5.24): refused
        with pytest.raises(BadRequestError, match="cannot honour temperature=1.3"):
            client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": questions[0]}],
                                           max_tokens=16, temperature=1.3)
        ask = lambda q: client.chat.completions.create(  # noqa: E731
            model=run.name, messages=[{"role": "user", "content": q}], max_tokens=16).choices[0].message.content
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, questions))
        assert [a.strip() for a in answers] == [e["text"] for e in expected]
        process.terminate()  # one SIGTERM ends it: the app's shutdown stops the batching worker thread
        assert process.wait(timeout=60) == 0, log.read_text(encoding="utf-8")[-2000:]
        assert "ContinuousBatchingLogger - INFO" not in log.read_text(encoding="utf-8")  # transformers' set-up chatter
        check_port_free("127.0.0.1", port)  # and the next `serve` on the same port may start at once
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


# (request body, status): refused by the schema (422) or by the training data's rules (400, 404), never 500.
HI = [{"role": "user", "content": "Hi."}]
BAD_REQUESTS = [
    ({}, 422),  # no messages (transformers alone: 500)
    ({"messages": []}, 422),
    ({"messages": "Hi."}, 422),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422),  # a role training never saw
    ({"messages": [{"role": "developer", "content": "x"}, *HI]}, 422),
    ({"messages": [{"role": "user"}]}, 422),
    ({"messages": [{"role": "user", "content": 42}]}, 422),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 422),
    ({"messages": [{"role": "assistant", "content": "Hello."}]}, 400),  # out of order
    ({"messages": [*HI, {"role": "assistant", "content": "Hello."}]}, 400),  # nothing to answer
    ({"messages": [*HI, {"role": "system", "content": "Be brief."}]}, 400),  # system not first
    ({"messages": [*HI, *HI]}, 400),
    ({"messages": [{"role": "user", "content": "   "}]}, 400),
    ({"messages": [{"role": "user", "content": "Say <|assistant|>"}]}, 400),  # special-token text
    ({"messages": HI, "max_tokens": 0}, 422),
    ({"messages": HI, "max_tokens": -5}, 422),
    ({"messages": HI, "max_tokens": "many"}, 422),
    ({"messages": HI, "temperature": -1}, 422),
    ({"messages": HI, "temperature": 1e9}, 422),
    ({"messages": HI, "top_p": 0}, 422),
    ({"messages": HI, "top_p": 1.5}, 422),
    ({"messages": HI, "frequency_penalty": -1}, 422),
    ({"messages": HI, "seed": -1}, 422),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 422),
    ({"messages": HI, "stop": [""]}, 422),
    ({"messages": HI, "n": 2}, 422),  # not honoured, so refused rather than ignored
    ({"messages": HI, "tools": [{"type": "function"}]}, 422),
    ({"messages": HI, "stream": "sometimes"}, 422),
    ({"messages": HI, "model": "another-model"}, 404),
    ([1, 2, 3], 422),
]


@pytest.fixture(scope="module")
def tiny_app():
    from fastapi.testclient import TestClient

    from tinyllama_ft.model.loading import build_tiny_model, build_tiny_tokenizer
    from tinyllama_ft.inference.serve import build_app

    return TestClient(build_app(build_tiny_model().eval(), build_tiny_tokenizer(), "tiny", max_new_tokens=6),
                      raise_server_exceptions=False)


@pytest.mark.parametrize("body, status", BAD_REQUESTS, ids=[str(b)[:50] for b, _ in BAD_REQUESTS])
def test_a_bad_request_gets_4xx_with_an_openai_error_and_the_next_good_one_its_answer(tiny_app, body, status):
    answer = tiny_app.post("/v1/chat/completions", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error"), error
    good = tiny_app.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 3})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 3


def test_a_body_that_is_not_json_gets_400(tiny_app):
    answer = tiny_app.post("/v1/chat/completions", content=b"{'single': quotes}",
                           headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]


def test_max_tokens_is_capped_by_the_server_and_the_context(tiny_app):
    answer = tiny_app.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 10**9})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 6  # --max_new_tokens 6
    long = [{"role": "user", "content": "apple " * 1100}]  # beyond the tiny model's 1024 positions
    assert tiny_app.post("/v1/chat/completions", json={"messages": long}).status_code == 400


def test_the_schema_lists_only_what_is_served(tiny_app):
    schema = tiny_app.get("/openapi.json").json()
    # no /reset; /load_model because `transformers chat` asks it first (tests/test_consumers.py drives that client)
    assert sorted(schema["paths"]) == ["/health", "/load_model", "/v1/chat/completions", "/v1/models"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["messages"] and request["additionalProperties"] is False


def test_load_model_says_the_served_model_is_ready_and_refuses_another(tiny_app):
    """As transformers serve answers `POST /load_model`: one server-sent `ready` event for the model served; any
    other name is a 404 naming the one served, like a chat completion for it."""
    ready = tiny_app.post("/load_model", json={"model": "tiny"})
    assert ready.status_code == 200 and ready.headers["content-type"].startswith("text/event-stream")
    assert [json.loads(line[6:]) for line in ready.text.splitlines() if line] == [
        {"status": "ready", "model": "tiny", "cached": True}]
    other = tiny_app.post("/load_model", json={"model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"})
    assert other.status_code == 404
    assert other.json()["error"]["message"] == ("model 'TinyLlama/TinyLlama-1.1B-Chat-v1.0' is not served here: use "
                                                "'tiny' (GET /v1/models)")
    assert tiny_app.post("/load_model", json={}).status_code == 422


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    from tinyllama_ft.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--adapter", str(tmp_path / "nowhere"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: port {port} on 127.0.0.1 is already in use (another server?): pass another --port or "
                   "stop that server"]
    assert main(["serve", "--adapter", str(tmp_path), "--host", "no-such-host.invalid"]) == 2
    assert "is not an address of this machine" in capsys.readouterr().err
    assert main(["serve", "--adapter", str(tmp_path), "--request_timeout", "0"]) == 2
    assert "--request_timeout > 0" in capsys.readouterr().err


@pytest.mark.parametrize("found", ["5.23.0", "5.25.0", "6.0.0"])
def test_serve_refuses_a_transformers_it_was_not_written_for_in_one_line_before_loading(tmp_path, capsys, monkeypatch,
                                                                                        found):
    """serve subclasses transformers' server, private API that 5.25 rewrote (tests above fail there with a TypeError
    deep in the start-up): another version is one line naming the install that works, before the model loads."""
    import transformers

    from tinyllama_ft.cli import main

    run = stories_run()
    monkeypatch.setattr(transformers, "__version__", found)
    assert main(["serve", "--adapter", str(run), "--port", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: serve needs transformers 5.24 (its server's API changed in 5.25), found {found}: "
        "pip install 'transformers[serving]>=5.24,<5.25'"]


@pytest.mark.parametrize("body, refused", [
    ({"temperature": 0.8}, "temperature=0.8"),
    ({"temperature": 0.8, "top_p": 0.5}, "temperature=0.8, top_p=0.5"),
    ({"generation_config": '{"repetition_penalty": 1.3}'}, "repetition_penalty=1.3"),
    ({"generation_config": '{"do_sample": true}'}, "do_sample=True"),
    ({"temperature": 0}, None), ({"top_p": 0.5}, None), ({"max_tokens": 3}, None), ({}, None)])
def test_continuous_batching_refuses_settings_it_would_share_and_answers_the_rest_greedily(body, refused):
    """transformers 5.24's continuous batching decodes every request with the first request's settings (a sampled
    first request would make every later greedy request sample): such settings get 400 naming them; what it sets per
    request (the budget) and sampling knobs of a greedy request are answered, greedily, as `generate` answers."""
    from fastapi.testclient import TestClient

    from tinyllama_ft.model.loading import build_tiny_model, build_tiny_tokenizer
    from tinyllama_ft.inference.serve import build_app

    model, tokenizer = build_tiny_model().eval(), build_tiny_tokenizer()
    with TestClient(build_app(model, tokenizer, "tiny", max_new_tokens=6, continuous_batching=True),
                    raise_server_exceptions=False) as client:
        answer = client.post("/v1/chat/completions", json={"messages": HI, **body})
        if refused:
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["message"] == (
                f"serve --continuous_batching decodes every request alike (greedy, with the model's settings) and "
                f"cannot honour {refused}: send the request without it, or serve without --continuous_batching")
        else:
            assert answer.status_code == 200, answer.text
            expected = generate(model, tokenizer, [HI], max_new_tokens=body.get("max_tokens", 6), progress=False)
            assert answer.json()["choices"][0]["message"]["content"] == expected[0]["text"]
