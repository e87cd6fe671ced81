"""What `serve` accepts and answers, as a schema: the request body of `POST /v1/chat/completions` with the
generation settings a request may carry (pydantic, so FastAPI validates them and publishes them in
`/openapi.json`), the turns a conversation may have, the answer and its streamed chunks in OpenAI's wire
format, and OpenAI-style error bodies (`{"error": {"message", "type", "param", "code"}}`) for every refusal.

A field the server cannot honour (`n` above 1, `tools`, `logprobs`, `response_format`...) is refused with
422, not ignored; so are roles the training data would refuse (`tool`, `developer`, a system turn after the
first) and turns out of order: training saw an optional system turn, then user and assistant alternating,
and an answer is asked after a user turn."""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UserError

GREEDY = "0 (or below 0.001, where sampling overflows): greedy"
ONE_CHOICE = "this server returns one choice per request: send 1 (or leave it out) and repeat the request for more"


class TextPart(BaseModel):
    """OpenAI's content part of type text (`[{"type": "text", "text": "..."}]`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="system (first only), user or assistant")
    content: str | list[TextPart] = Field(description="the turn's text (or text parts)")
    name: str | None = Field(None, description="accepted and ignored, as OpenAI's servers do for these roles")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class LoadModelRequest(BaseModel):
    """`POST /load_model`, which `transformers chat` sends before its first message (transformers serve's
    endpoint): the model it names must be the one served."""
    model_config = ConfigDict(extra="allow")  # transformers serve reads only `model`
    model: str


def one_answer(field: str):
    """The validator of `field` (`n`, `num_return_sequences`): one answer a request, or a 422 saying why."""
    def check(cls, value):
        if value is not None and value > 1:
            raise ValueError(f"{field}={value}: {ONE_CHOICE}")
        return value
    return field_validator(field)(classmethod(check))


def up_to_four_stops(field: str):
    """The validator of `field` (`stop`, `stop_strings`): a string or up to 4 non-empty strings."""
    def check(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop
    return field_validator(field)(classmethod(check))


class GenerationSettings(BaseModel):
    """transformers' generation settings a request may send as `generation_config` (what `transformers chat`
    sends: `GenerationConfig.to_json_string()`), laid over the model's own. Only these; each checked here."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(None, ge=1, description="the answer budget (capped as max_tokens is)")
    min_new_tokens: int | None = Field(None, ge=0, le=2**20)
    max_length: int | None = Field(None, ge=1, description="ignored: the budget is max_new_tokens")
    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description=GREEDY)
    top_k: int | None = Field(None, ge=0, le=2**20)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    typical_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100, allow_inf_nan=False)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=2**20)
    num_beams: int | None = Field(None, ge=1, le=16)
    length_penalty: float | None = Field(None, ge=-100, le=100, allow_inf_nan=False)
    num_return_sequences: int | None = Field(None, ge=1, description="1 only")
    max_time: float | None = Field(None, gt=0, allow_inf_nan=False, description="capped by --request_timeout")
    stop_strings: str | list[str] | None = Field(None, description="up to 4 non-empty strings")
    use_cache: bool | None = None
    transformers_version: str | None = Field(None, description="accepted and ignored")

    _one = one_answer("num_return_sequences")
    _stops = up_to_four_stops("stop_strings")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = Field(None, description="a last chunk with the usage (and no choices)")


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1, max_length=512)
    model: str | None = Field(None, description="must be the served model's id when given (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="capped at what the context leaves")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description=GREEDY)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-0.99, le=2, allow_inf_nan=False,
                                            description="as transformers serve: repetition_penalty = 1 + this")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seeds a sampled answer")
    n: int | None = Field(None, ge=1, description="1 only")
    stop: str | list[str] | None = Field(None, description="up to 4 strings")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    generation_config: GenerationSettings | None = Field(
        None, description="transformers' own field (what `transformers chat` sends): generation settings laid over "
        "the model's, as a JSON object or its text; its max_new_tokens is the request's budget")

    @field_validator("generation_config", mode="before")
    @classmethod
    def _generation_config(cls, config):
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                raise ValueError("generation_config must be a JSON object") from None
        if config is not None and not isinstance(config, (dict, GenerationSettings)):
            raise ValueError("generation_config must be a JSON object")
        return config

    _one = one_answer("n")
    _stops = up_to_four_stops("stop")

    def budget(self) -> int | None:
        """The answer budget the request sets itself, in whichever field carries it."""
        settings = self.generation_config.max_new_tokens if self.generation_config else None
        return next((b for b in (self.max_completion_tokens, self.max_tokens, settings) if b is not None), None)


# --- answers, in OpenAI's wire format ----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AnswerMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def event(self) -> str:
        """The chunk as one server-sent event."""
        return f"data: {self.model_dump_json(exclude_none=False)}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tinyllama-ft"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- the conversation's shape and the refusals ---------------------------------------------------------------------

def check_turns(messages: list[dict]) -> None:
    """Refuse (UserError) a conversation training would not have formatted this way."""
    for number, message in enumerate(messages):
        if not message["content"].strip():
            raise UserError(f"message {number} ({message['role']}) is empty: give every turn some text")
        if message["role"] == "system" and number > 0:
            raise UserError(f"message {number} is a system turn: only the first message may be one")
    expected = "user"
    for number, message in enumerate(messages):
        if message["role"] == "system":
            continue
        if message["role"] != expected:
            raise UserError(f"message {number} is {_a(message['role'])} turn where {_a(expected)} turn was expected: "
                            "after an optional system turn, user and assistant turns alternate")
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "user":
        raise UserError(f"the last message is {_a(messages[-1]['role'])} turn: end the conversation with the user "
                        "turn to answer")


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def add_error_handlers(app) -> None:
    """Every refusal in OpenAI's error shape: schema errors 422 (field and problem), HTTP errors theirs."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail, at = (first.get("ctx") or {}).get("error", "JSON decode error"), first.get("loc", ("",))[-1]
            message = f"the body is not valid JSON (at character {at}: {detail}): send one JSON object"
            return JSONResponse(error_body(message, 400), status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
        message = f"{param or 'body'}: {first.get('msg')}{more}"
        return JSONResponse(error_body(message, 422, param), status_code=422)

    @app.exception_handler(HTTPException)
    async def refused(request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request, error: Exception):  # a defect of ours: say so, in the same shape
        return JSONResponse(error_body(f"internal error ({type(error).__name__}): please report it", 500), 500)
