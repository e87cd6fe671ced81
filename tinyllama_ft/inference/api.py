"""What `serve` accepts, as a schema: the request body of `POST /v1/chat/completions` (pydantic, so FastAPI
validates it and publishes it in `/openapi.json`), the turns a conversation may have, and OpenAI-style
error bodies (`{"error": {"message", "type", "param", "code"}}`) for every refusal.

A field the server cannot honour (`n`, `tools`, `logprobs`, `response_format`...) is refused with 422, not
ignored; so are roles the training data would refuse (`tool`, `developer`, a system turn after the first)
and turns out of order: training saw an optional system turn, then user and assistant alternating, and
an answer is asked after a user turn."""

from __future__ import annotations

import json

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UserError


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


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1, max_length=512)
    model: str | None = Field(None, description="must be the served model's id when given (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="capped at what the context leaves")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, gt=-1, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = Field(None, description="up to 4 strings")
    stream: bool | None = False
    generation_config: str | dict | None = Field(
        None, description="transformers' own field (what `transformers chat` sends): a JSON object of generation "
        "settings laid over the model's; its max_new_tokens is the request's budget")

    @field_validator("generation_config")
    @classmethod
    def _generation_config(cls, config):
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                raise ValueError("generation_config must be a JSON object") from None
        if config is not None and not isinstance(config, dict):
            raise ValueError("generation_config must be a JSON object")
        return config

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop


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
