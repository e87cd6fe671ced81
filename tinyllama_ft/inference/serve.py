"""`python -m tinyllama_ft serve`: an OpenAI-compatible server (`POST /v1/chat/completions`, streaming or
not, `GET /v1/models`) for a run folder or a merged export, on FastAPI and uvicorn.

Every request is checked against `api.ChatCompletionRequest` (published in `/openapi.json`) and built as
training built its rows: the run's system prompt first unless the request brings one, then `encode_prompt`'s
ids (one BOS, the saved chat template). Special-token text in a message (`</s>`, `<|user|>`...) and a
conversation longer than the model's context get HTTP 400; another model's name 404. Without `max_tokens`
an answer gets the room the context has left, at most `--max_new_tokens`, and at most `--request_timeout`
seconds. The model is the one `load_saved` loads (the adapter as it is, no merge), so a greedy answer equals
`generate`'s, stripped the same way, streamed or not, and stops at `</s>` (the generation config's EOS).

By default requests that arrive together share the model's steps (continuous batching, `engine.py`); a
request with its own sampling settings runs on its own (`model.generate`) and gets exactly what it asked for.
"""

import contextlib
import errno
import json
import logging
import socket
import uuid
from pathlib import Path

from ..data.chat_template import PROBES
from ..data.encoding import encode_prompt
from ..errors import UserError
from ..model.batching import serving_cache_config
from ..storage.saved_model import context_length, load_saved, saved_system_prompt
from .api import (AnswerMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
                  Delta, LoadModelRequest, ModelCard, ModelList, Usage, add_error_handlers, check_turns, error_body)
from .engine import Done, Engine, Job, Stripped, request_config

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024  # the most tokens an answer gets unless --max_new_tokens says otherwise
DEFAULT_TIMEOUT_S = 300.0  # the longest a request may generate
TRANSFORMERS_RANGE = ">=5.24,<6"  # as pyproject.toml: continuous batching's public API as 5.24 and 5.25 have it


def check_server_version() -> None:
    """Refuse, in one line, a transformers outside the range serve is tested on (`init_continuous_batching`,
    `pause`, `register_result_handler` and `cancel_request` of its manager are 5.24's public API)."""
    import transformers
    from packaging.version import Version

    if not Version("5.24") <= Version(transformers.__version__) < Version("6"):
        raise UserError(f"serve needs transformers{TRANSFORMERS_RANGE}, found {transformers.__version__}: "
                        f"pip install 'transformers{TRANSFORMERS_RANGE}'")


def check_prompt_ids(tokenizer) -> None:
    """Raise unless `tokenizer`'s chat template, rendered with `tokenize=True` (as `transformers serve` and other
    servers of the saved folder call it), gives `encode_prompt`'s ids: it must write the BOS (the saved template
    does, `chat_template.add_bos_to_template`). This server feeds `encode_prompt`'s ids itself."""
    for messages in PROBES:
        served_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")["input_ids"][0].tolist()
        if served_ids != encode_prompt(tokenizer, messages):
            raise UserError("the chat template gives other prompt ids than training did "
                            f"({served_ids[:8]}... vs {encode_prompt(tokenizer, messages)[:8]}...): "
                            "serve a run of this project or its merged export")


def generation_settings(body: ChatCompletionRequest) -> dict:
    """The request's generation settings in transformers' names: its `generation_config`, then OpenAI's fields
    (which win), mapped as `transformers serve` maps them."""
    settings = body.generation_config.model_dump(exclude_none=True) if body.generation_config else {}
    if body.temperature is not None:
        settings["temperature"] = body.temperature
    if body.top_p is not None:
        settings["top_p"] = body.top_p
    if body.frequency_penalty is not None:
        settings["repetition_penalty"] = 1.0 + body.frequency_penalty
    if body.stop is not None:
        settings["stop_strings"] = body.stop
    return settings


def build_app(model, tokenizer, name: str, system_prompt: str | None = None, max_new_tokens: int = DEFAULT_MAX_TOKENS,
              request_timeout_s: float = DEFAULT_TIMEOUT_S, continuous_batching: bool = False):
    """A FastAPI app serving `model` (already loaded) under the id `name`: `POST /v1/chat/completions`,
    `GET /v1/models`, `GET /health`, and `POST /load_model` for `transformers chat`. Requests without a system
    message get `system_prompt` (the run's own) first, as training formatted its rows. An answer gets at most
    `max_new_tokens` and what the context leaves, and generation stops after `request_timeout_s`.
    `continuous_batching` (`serve`'s default): requests that arrive together share the model's steps, started
    and stopped with the app's lifespan; off, each request generates on its own, one after another."""
    check_server_version()
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError as error:
        raise UserError(f"serve needs FastAPI and uvicorn ({error}): pip install 'tinyllama-ft[serve]'") from None

    engine = Engine(model, tokenizer, continuous_batching,
                    serving_cache_config(model) if continuous_batching else None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start(request_timeout_s)
        try:
            yield
        finally:
            engine.stop()  # the batching worker thread, which would keep the process from exiting

    app = FastAPI(title="tinyllama-ft serve", version="1", lifespan=lifespan)
    add_error_handlers(app)

    def refuse_other(model_name: str | None) -> None:
        if model_name is not None and model_name != name:
            raise HTTPException(status_code=404, detail=f"model {model_name!r} is not served here: use {name!r} "
                                "(GET /v1/models)")

    def prompt_ids(body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        try:
            check_turns(messages)
            ids = encode_prompt(tokenizer, messages)
        except UserError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        if len(ids) >= context_length(model):
            raise HTTPException(status_code=400, detail=f"the conversation is {len(ids)} tokens, the model's "
                                f"context {context_length(model)}: drop its oldest turns")
        return ids

    def job_for(body: ChatCompletionRequest) -> Job:
        ids = prompt_ids(body)
        budget = min(body.budget() or max_new_tokens, context_length(model) - len(ids), max_new_tokens)
        try:
            config = request_config(model, tokenizer, generation_settings(body), budget, request_timeout_s)
        except ValueError as error:
            raise HTTPException(status_code=400, detail=f"generation settings: {error}") from None
        if body.stream and (config.num_beams or 1) > 1:
            raise HTTPException(status_code=400, detail="num_beams > 1 cannot stream (beam search ends with the "
                                "best beam): send the request with stream false, or num_beams 1")
        sampling = bool(config.do_sample)
        return Job(ids, config, body.seed if sampling else None)

    def finish_reason(ids: list[int], text: str, config) -> str:
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings or []
        ended = tokenizer.eos_token_id in ids or any(stop in text for stop in stops)
        return "stop" if ended else "length"

    def usage(job: Job, ids: list[int]) -> Usage:
        new = answer_ids(ids)
        return Usage(prompt_tokens=len(job.ids), completion_tokens=len(new),
                     total_tokens=len(job.ids) + len(new))

    def answer_ids(ids: list[int]) -> list[int]:  # cut after the first EOS, as `decode_answer` counts
        eos = tokenizer.eos_token_id
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    def answer_text(ids: list[int]) -> str:
        kept = [i for i in answer_ids(ids) if i != tokenizer.eos_token_id]
        return tokenizer.decode(kept, skip_special_tokens=True).strip()  # as `generate`'s `decode_answer`

    async def complete(job: Job, request_id: str) -> ChatCompletion:
        try:
            done = [item async for item in engine.run(job, False, request_id) if isinstance(item, Done)]
        except ValueError as error:  # settings transformers refuses only once generating
            raise HTTPException(status_code=400, detail=f"generation settings: {error}") from None
        for item in done:
                text = answer_text(item.ids)
                return ChatCompletion(id=f"chatcmpl-{request_id}", model=name, usage=usage(job, item.ids), choices=[
                    Choice(message=AnswerMessage(content=text), finish_reason=finish_reason(item.ids, text, job.config))])
        raise RuntimeError("the answer ended without its last ids")

    async def chunks(job: Job, request_id: str, include_usage: bool):
        chunk = lambda **fields: ChatCompletionChunk(id=f"chatcmpl-{request_id}", model=name, **fields).event()  # noqa: E731
        yield chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
        stripped = Stripped()
        try:
            async for item in engine.run(job, True, request_id):
                if isinstance(item, Done):
                    reason = finish_reason(item.ids, answer_text(item.ids), job.config)
                    yield chunk(choices=[ChunkChoice(delta=Delta(), finish_reason=reason)])
                    if include_usage:
                        yield chunk(choices=[], usage=usage(job, item.ids))
                elif text := stripped.feed(item):
                    yield chunk(choices=[ChunkChoice(delta=Delta(content=text))])
        except ValueError as error:  # the answer has begun (HTTP 200): the refusal is the stream's last event
            yield f"data: {json.dumps(error_body(f'generation settings: {error}', 400))}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        refuse_other(body.model)
        job = job_for(body)
        request_id = request.state.request_id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chunks(job, request_id, include_usage), media_type="text/event-stream")
        return await complete(job, request_id)

    @app.post("/load_model")
    async def load_model(body: LoadModelRequest):
        """As transformers serve answers it (one server-sent event), for `transformers chat`: the model is loaded."""
        refuse_other(body.model)
        event = json.dumps({"status": "ready", "model": name, "cached": True})
        return StreamingResponse(iter([f"data: {event}\n\n"]), media_type="text/event-stream")

    @app.get("/v1/models", response_model=ModelList)
    def list_models():
        return ModelList(data=[ModelCard(id=name)])

    @app.get("/health")
    def health():
        return JSONResponse({"status": "ok"})

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        return response

    return app


def check_port_free(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when `host:port` cannot be listened on."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"--host {host} is not an address of this machine ({error.strerror}): pass 127.0.0.1 "
                        "or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # as uvicorn binds: a port whose last server just stopped (connections in TIME_WAIT) is free to it, and a
        # port another server listens on is refused. On Windows SO_REUSEADDR would let the bind share a busy port,
        # so there the test is an exclusive bind, which a stopped server's TIME_WAIT does not block.
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another server?): pass another --port "
                                "or stop that server") from None
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}): pass another --host or "
                            "--port") from None


def app_for(folder: str, max_new_tokens: int = DEFAULT_MAX_TOKENS, request_timeout_s: float = DEFAULT_TIMEOUT_S,
            continuous_batching: bool = True):
    """(the app, the model's name) for `folder`: anything `load_saved` loads, with the run's system prompt."""
    model, tokenizer = load_saved(folder)
    name = Path(folder).resolve().name
    return build_app(model, tokenizer, name, saved_system_prompt(folder), max_new_tokens, request_timeout_s,
                     continuous_batching), name


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int = DEFAULT_MAX_TOKENS,
          request_timeout_s: float = DEFAULT_TIMEOUT_S, continuous_batching: bool = True) -> None:
    """Load `folder` (a run, a checkpoint of one, or a merged export) and serve it until interrupted."""
    import uvicorn

    if max_new_tokens < 1 or not 0 < request_timeout_s < float("inf"):
        raise UserError(f"need --max_new_tokens >= 1 and --request_timeout > 0 seconds, got {max_new_tokens} and "
                        f"{request_timeout_s}")
    check_server_version()  # these two before the model loads, which can take minutes
    check_port_free(host, port)
    app, name = app_for(folder, max_new_tokens, request_timeout_s, continuous_batching)
    log.info("serving %s as model %r on http://%s:%d/v1 (POST /v1/chat/completions, GET /v1/models; continuous "
             "batching %s)", folder, name, host, port, "on" if continuous_batching else "off")
    uvicorn.run(app, host=host, port=port, log_level="warning")
