"""`python -m tinyllama_ft serve`: an OpenAI-compatible server (`POST /v1/chat/completions`,
streaming or not, and `GET /v1/models`) for a run folder or a merged export.

It is transformers' own server (`transformers serve`: FastAPI, OpenAI schemas, SSE streaming,
usage and finish reasons), given our model, with the two things it gets wrong for this model fixed:

* **No BOS.** `transformers serve` builds the prompt with `tokenizer.apply_chat_template(...,
  tokenize=True)`, which adds no special tokens, and TinyLlama-Chat's own template does not write `<s>`
  (measured on the smoke run: 20 prompt tokens instead of `encode_prompt`'s 21, and another answer than
  `generate`'s). The saved template writes it (`data/chat_template.py`), and before serving we check that the
  server's call gives exactly `encode_prompt`'s ids (`check_prompt_ids`), or refuse to start.
* **A request's own settings.** `transformers chat` sends its flags as a `generation_config`, which
  transformers' server takes instead of the model's (losing its EOS); here they are laid over the model's
  and win over the default budget below. Answers are stripped as `generate` strips them.
* **Special-token text.** A message holding `</s>`, `<|user|>`... would be read as control tokens;
  such a request gets HTTP 400 with `encode_prompt`'s message instead. So does a conversation longer
  than the model's context, and without `max_tokens` an answer is given the room the context has left
  (transformers' default, 1024 new tokens, ran past TinyLlama's 2048 positions on long prompts).

It also serves the adapter as it is (no merge, no temporary copy of the weights): the model that
answers is the one `load_saved` loads, so greedy answers equal `generate`'s. Requests are
greedy unless they set a temperature above 0 (then they sample: transformers alone would keep the
model's `do_sample=False` and answer greedily at any temperature), and stop at `</s>` (the
generation config's EOS).
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
from ..model.batching import CB_LOGGERS, serving_cache_config
from ..storage.saved_model import context_length, load_saved, saved_system_prompt
from .api import ChatCompletionRequest, LoadModelRequest, add_error_handlers, check_turns

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024  # transformers serve's default answer budget
DEFAULT_TIMEOUT_S = 300.0  # the longest a request may generate


SERVER_REQUIREMENT = "transformers[serving]>=5.24,<5.25"  # as pyproject.toml's serve extra


def check_server_version() -> None:
    """Refuse, in one line, a transformers whose server is not the one `build_app` subclasses: its handler and model
    manager are private API, and 5.25 rewrote them (`ModelManager(device=...)`, `_build_generation_config` gone)."""
    import transformers
    from packaging.version import Version

    if not Version("5.24") <= Version(transformers.__version__) < Version("5.25"):
        raise UserError(f"serve needs transformers 5.24 (its server's API changed in 5.25), found "
                        f"{transformers.__version__}: pip install \"{SERVER_REQUIREMENT}\"")


def check_prompt_ids(tokenizer) -> None:
    """Raise unless `tokenizer`, called as transformers' server calls it, gives `encode_prompt`'s ids: its chat
    template must write the BOS (the saved template does, `chat_template.add_bos_to_template`)."""
    for messages in PROBES:
        served_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")["input_ids"][0].tolist()
        if served_ids != encode_prompt(tokenizer, messages):
            raise UserError("the chat template gives other prompt ids than training did "
                            f"({served_ids[:8]}... vs {encode_prompt(tokenizer, messages)[:8]}...): "
                            "serve a run of this project or its merged export")


def requested_max_new_tokens(body: dict) -> int | None:
    """The answer budget a request sets itself, in whichever field carries it: OpenAI's `max_completion_tokens`
    or `max_tokens`, or the `max_new_tokens` of its transformers `generation_config` (JSON text or an object)."""
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return body[key]
    config = body.get("generation_config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None  # transformers answers the malformed JSON itself
    return config.get("max_new_tokens") if isinstance(config, dict) else None


PER_REQUEST = ("max_new_tokens", "eos_token_id", "max_time", "use_cache")  # what continuous batching sets per request
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")  # moot when greedy


def shared_settings_asked(config, greedy) -> list[str]:
    """The generation settings of a request's `config` (`name=value`) that differ from `greedy`, a plain request's:
    transformers 5.24's continuous batching takes them from the first request for every request after it (its
    `CBGenerateManager.init_cb`), so a server that batches continuously must refuse them. Sampling knobs of a
    request that does not sample change nothing and are not listed."""
    mine, plain = config.to_dict(), greedy.to_dict()
    sampling = bool(mine.get("do_sample"))
    skip = {*PER_REQUEST, "do_sample", "transformers_version", *(() if sampling else SAMPLING)}
    asked = [f"{key}={mine[key]!r}" for key in sorted(mine) if key not in skip and mine[key] != plain.get(key)]
    if not asked and sampling != bool(plain.get("do_sample")):  # do_sample alone (a generation_config's)
        asked = [f"do_sample={sampling!r}"]
    return asked


def merged_generation_config(request_config, model_config) -> str:
    """The request's generation settings over the model's: what the request sets wins, the rest (EOS, pad,
    greedy decoding) stays the model's. JSON text, as transformers' server reads the field."""
    settings = json.loads(request_config) if isinstance(request_config, str) else dict(request_config)
    base = model_config.to_diff_dict()
    base.pop("transformers_version", None)
    return json.dumps({**base, **settings})


def build_app(model, tokenizer, name: str, system_prompt: str | None = None, max_new_tokens: int = DEFAULT_MAX_TOKENS,
              request_timeout_s: float = DEFAULT_TIMEOUT_S, continuous_batching: bool = False):
    """A FastAPI app serving `model` (already loaded) under the id `name` with transformers' chat handler:
    `POST /v1/chat/completions` (its body validated against `api.ChatCompletionRequest`, published in
    `/openapi.json`), `GET /v1/models`, `GET /health`. Requests without a system message get
    `system_prompt` (the run's own) first, as training formatted its rows. An answer gets at most
    `max_new_tokens` and what the context leaves, and generation stops after `request_timeout_s`.
    `continuous_batching`: requests that arrive together share the model's steps (`transformers serve
    --continuous-batching`'s machinery: a paged cache, finished answers leave at once); off, each request
    generates on its own, one after another (benchmarks/serve_load.py measures both)."""
    check_server_version()
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import JSONResponse, StreamingResponse
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.utils import GenerationState
    except ImportError as error:  # no [serving] extras, or a transformers whose server is laid out otherwise
        raise UserError(f"serve needs transformers' server ({error}): pip install \"{SERVER_REQUIREMENT}\"") from None

    check_prompt_ids(tokenizer)  # transformers' server renders the saved template itself

    class OneModel(ModelManager):
        """The manager of `transformers serve --force-model`, handed our model instead of loading one."""

        @staticmethod
        def process_model_name(model_id: str) -> str:
            return model_id  # answers name the model as /v1/models does, without the hub's "@main"

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return tokenizer

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            return model

    class ChatCompletions(ChatCompletionHandler):
        def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
            """transformers' config for the request, where the request's own `generation_config` (what
            `transformers chat` sends) is laid over the model's (its EOS, greedy) instead of replacing it."""
            if body.get("generation_config") is not None:
                body = {**body, "generation_config": merged_generation_config(body["generation_config"],
                                                                              model_generation_config)}
            config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            if float(body.get("temperature") or 0) > 0:
                config.do_sample = True  # transformers keeps the model's do_sample (False): greedy at any temperature
            config.max_time = request_timeout_s  # a request is bounded in time, whatever it asks
            if use_cb:
                greedy = super()._build_generation_config({}, model_generation_config, use_cb=True)
                asked = shared_settings_asked(config, greedy)
                if asked:
                    raise HTTPException(status_code=400, detail=(
                        f"serve --continuous_batching decodes every request alike (greedy, with the model's settings) "
                        f"and cannot honour {', '.join(asked)}: send the request without it, or serve without "
                        "--continuous_batching"))
            return config

        def _build_completion(self, request_id, content, *args, **kwargs):
            return super()._build_completion(request_id, content.strip(), *args, **kwargs)  # as generate's text

        def _build_chunk_sse(self, request_id: str = "", content: str | None = None, *args, **kwargs):
            """Streamed, the same text: leading whitespace dropped, trailing whitespace held back until more
            text follows (so it never arrives after the last word), as `chat` streams."""
            state = held.setdefault(request_id, {"started": False, "pending": ""})
            if content is not None:
                text = state["pending"] + content
                text = text if state["started"] else text.lstrip()
                content = text.rstrip()
                state["pending"], state["started"] = text[len(content):], state["started"] or bool(content)
            if kwargs.get("finish_reason") is not None:
                held.pop(request_id, None)
            return super()._build_chunk_sse(request_id, content, *args, **kwargs)

    held: dict[str, dict] = {}  # per streamed request: started, whitespace held back

    manager = OneModel(device=str(next(model.parameters()).device), force_model=name)
    if continuous_batching:  # its set-up and per-batch INFO lines (its own handler): warnings and errors only
        for logger_name in CB_LOGGERS:
            logging.getLogger(logger_name).setLevel(logging.WARNING)
    state = GenerationState(continuous_batching=continuous_batching,
                            cb_config=serving_cache_config(model) if continuous_batching else None)
    handler = ChatCompletions(manager, state)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.shutdown()  # the continuous-batching worker thread, which would keep the process from exiting

    app = FastAPI(title="tinyllama-ft serve", version="1", lifespan=lifespan)
    add_error_handlers(app)

    def refuse_other(model: str | None) -> None:
        if model is not None and model != name:
            raise HTTPException(status_code=404, detail=f"model {model!r} is not served here: use {name!r} "
                                "(GET /v1/models)")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        refuse_other(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        try:
            check_turns(messages)
            prompt = encode_prompt(tokenizer, messages)
        except UserError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        room = context_length(model) - len(prompt)
        if room < 1:
            raise HTTPException(status_code=400, detail=f"the conversation is {len(prompt)} tokens, the model's "
                                f"context {context_length(model)}: drop its oldest turns")
        fields = body.model_dump(exclude_none=True, exclude={"messages", "max_completion_tokens", "model"})
        asked = requested_max_new_tokens(body.model_dump(exclude_none=True)) or max_new_tokens
        fields |= {"messages": messages, "model": name, "max_tokens": min(asked, room, max_new_tokens)}
        return await handler.handle_request(fields, request.state.request_id)

    @app.post("/load_model")
    async def load_model(body: LoadModelRequest):
        """As transformers serve answers it (one server-sent event), for `transformers chat`: the model is loaded."""
        refuse_other(body.model)
        event = json.dumps({"status": "ready", "model": name, "cached": True})
        return StreamingResponse(iter([f"data: {event}\n\n"]), media_type="text/event-stream")

    @app.get("/v1/models")
    def list_models():
        return JSONResponse({"object": "list", "data": manager.list_models()})

    @app.get("/health")
    def health():
        return JSONResponse({"status": "ok"})

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
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
        # port another server listens on is still refused
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
            continuous_batching: bool = False):
    """(the app, the model's name) for `folder`: anything `load_saved` loads, with the run's system prompt."""
    model, tokenizer = load_saved(folder)
    name = Path(folder).resolve().name
    return build_app(model, tokenizer, name, saved_system_prompt(folder), max_new_tokens, request_timeout_s,
                     continuous_batching), name


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int = DEFAULT_MAX_TOKENS,
          request_timeout_s: float = DEFAULT_TIMEOUT_S, continuous_batching: bool = False) -> None:
    """Load `folder` (a run, a checkpoint of one, or a merged export) and serve it until interrupted."""
    import uvicorn

    if max_new_tokens < 1 or not 0 < request_timeout_s < float("inf"):
        raise UserError(f"need --max_new_tokens >= 1 and --request_timeout > 0 seconds, got {max_new_tokens} and "
                        f"{request_timeout_s}")
    check_server_version()  # these two before the model loads, which can take minutes
    check_port_free(host, port)
    app, name = app_for(folder, max_new_tokens, request_timeout_s, continuous_batching)
    log.info("serving %s as model %r on http://%s:%d/v1 (POST /v1/chat/completions, GET /v1/models)",
             folder, name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
