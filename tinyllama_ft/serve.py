"""`python -m tinyllama_ft serve`: an OpenAI-compatible server (`POST /v1/chat/completions`,
streaming or not, and `GET /v1/models`) for a run folder or a merged export.

It is transformers' own server (`transformers serve`: FastAPI, OpenAI schemas, SSE streaming,
usage and finish reasons), given our model, with the two things it gets wrong for this model fixed:

* **No BOS.** `transformers serve` builds the prompt with `tokenizer.apply_chat_template(...,
  tokenize=True)`, and TinyLlama-Chat's template does not write `<s>`: the server feeds the model
  a prompt without the BOS that every training row began with (measured on the smoke run:
  20 prompt tokens instead of `encode_prompt`'s 21, and another answer than `generate`'s).
  Here the served tokenizer puts the BOS first (`served_tokenizer`), and before serving we check
  that it gives exactly `encode_prompt`'s ids (`check_prompt_ids`), or refuse to start.
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

import copy
import errno
import logging
import socket
import uuid
from pathlib import Path

from .api import ChatCompletionRequest, add_error_handlers, check_turns
from .encoding import encode_prompt
from .errors import UserError
from .saved_model import context_length, load_saved, saved_system_prompt

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024  # transformers serve's default answer budget
DEFAULT_TIMEOUT_S = 300.0  # the longest a request may generate
PROBES = [  # conversations whose prompt ids the served tokenizer must give exactly as encode_prompt
    [{"role": "user", "content": "Name three primes."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Summarize this.\n\nContext:\nA cat sat on a mat."},
     {"role": "assistant", "content": "A cat sat."}, {"role": "user", "content": "Shorter?"}],
]


def served_tokenizer(tokenizer):
    """A copy of `tokenizer` whose `apply_chat_template` (what transformers' server tokenizes the
    messages with) puts the BOS first, as `encode_prompt` does. The BOS cannot go into the template
    text instead: SentencePiece would then tokenize what follows `<s>` without its leading "▁"
    (`<|user|>` starts with id 29966 instead of 529 on TinyLlama), another prompt than training's."""
    from transformers import BatchEncoding

    served = copy.deepcopy(tokenizer)
    stock, bos = served.apply_chat_template, tokenizer.bos_token_id

    def apply_chat_template(conversation, *args, return_tensors=None, **kwargs):
        if not (kwargs.get("tokenize", True) and kwargs.get("return_dict")):
            return stock(conversation, *args, return_tensors=return_tensors, **kwargs)
        encoded = stock(conversation, *args, return_tensors=None, **kwargs)
        ids, mask = list(encoded["input_ids"]), list(encoded.get("attention_mask") or [1] * len(encoded["input_ids"]))
        if bos is not None and (not ids or ids[0] != bos):
            ids, mask = [bos, *ids], [1, *mask]
        if return_tensors is None:
            return BatchEncoding({"input_ids": ids, "attention_mask": mask})
        return BatchEncoding({"input_ids": [ids], "attention_mask": [mask]}, tensor_type=return_tensors)

    served.apply_chat_template = apply_chat_template
    check_prompt_ids(served, tokenizer)
    return served


def check_prompt_ids(served, tokenizer) -> None:
    """Raise unless `served`, called as transformers' server calls it, gives `encode_prompt`'s ids."""
    for messages in PROBES:
        served_ids = served.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")["input_ids"][0].tolist()
        if served_ids != encode_prompt(tokenizer, messages):
            raise UserError("the served tokenizer gives other prompt ids than training did "
                            f"({served_ids[:8]}... vs {encode_prompt(tokenizer, messages)[:8]}...): "
                            "serve a run of this project or its merged export")


def build_app(model, tokenizer, name: str, system_prompt: str | None = None, max_new_tokens: int = DEFAULT_MAX_TOKENS,
              request_timeout_s: float = DEFAULT_TIMEOUT_S):
    """A FastAPI app serving `model` (already loaded) under the id `name` with transformers' chat handler:
    `POST /v1/chat/completions` (its body validated against `api.ChatCompletionRequest`, published in
    `/openapi.json`), `GET /v1/models`, `GET /health`. Requests without a system message get
    `system_prompt` (the run's own) first, as training formatted its rows. An answer gets at most
    `max_new_tokens` and what the context leaves, and generation stops after `request_timeout_s`."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import JSONResponse
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.utils import GenerationState
    except ImportError as error:  # no [serving] extras, or a transformers whose server is laid out otherwise
        raise UserError(f"serve needs transformers' server ({error}): pip install 'transformers[serving]>=5.24,<6'") from None

    served = served_tokenizer(tokenizer)

    class OneModel(ModelManager):
        """The manager of `transformers serve --force-model`, handed our model instead of loading one."""

        @staticmethod
        def process_model_name(model_id: str) -> str:
            return model_id  # answers name the model as /v1/models does, without the hub's "@main"

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return served

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            return model

    class ChatCompletions(ChatCompletionHandler):
        def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
            config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            if float(body.get("temperature") or 0) > 0:
                config.do_sample = True  # transformers keeps the model's do_sample (False): greedy at any temperature
            config.max_time = request_timeout_s  # a request is bounded in time, whatever it asks
            return config

    manager = OneModel(device=str(next(model.parameters()).device), force_model=name)
    state = GenerationState()
    handler = ChatCompletions(manager, state)
    app = FastAPI(title="tinyllama-ft serve", version="1", lifespan=None)
    add_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        if body.model is not None and body.model != name:
            raise HTTPException(status_code=404, detail=f"model {body.model!r} is not served here: use {name!r} "
                                "(GET /v1/models)")
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
        asked = body.max_completion_tokens or body.max_tokens or max_new_tokens
        fields = body.model_dump(exclude_none=True, exclude={"messages", "max_completion_tokens", "model"})
        fields |= {"messages": messages, "model": name, "max_tokens": min(asked, room, max_new_tokens)}
        return await handler.handle_request(fields, request.state.request_id)

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
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another server?): pass another --port "
                                "or stop that server") from None
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}): pass another --host or "
                            "--port") from None


def app_for(folder: str, max_new_tokens: int = DEFAULT_MAX_TOKENS, request_timeout_s: float = DEFAULT_TIMEOUT_S):
    """(the app, the model's name) for `folder`: anything `load_saved` loads, with the run's system prompt."""
    model, tokenizer = load_saved(folder)
    name = Path(folder).resolve().name
    return build_app(model, tokenizer, name, saved_system_prompt(folder), max_new_tokens, request_timeout_s), name


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int = DEFAULT_MAX_TOKENS,
          request_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Load `folder` (a run, a checkpoint of one, or a merged export) and serve it until interrupted."""
    import uvicorn

    if max_new_tokens < 1 or not 0 < request_timeout_s < float("inf"):
        raise UserError(f"need --max_new_tokens >= 1 and --request_timeout > 0 seconds, got {max_new_tokens} and "
                        f"{request_timeout_s}")
    check_port_free(host, port)  # before the model loads, which can take minutes
    app, name = app_for(folder, max_new_tokens, request_timeout_s)
    log.info("serving %s as model %r on http://%s:%d/v1 (POST /v1/chat/completions, GET /v1/models)",
             folder, name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
