"""OpenAI API shapes for `hfpipe serve`: the request bodies of /v1/chat/completions and /v1/completions (pydantic
models plus the checks pydantic cannot express), and the JSON of responses, stream chunks, models and errors as
OpenAI's API returns them, so that unmodified OpenAI clients can parse them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Request fields we cannot honour, with the value that means "not used"; any other value is a 400, not silently
# ignored. Fields not listed here and not modelled below (user, metadata, store, ...) are ignored.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    """A request the server cannot serve; answered with OpenAI's error JSON and an HTTP status."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.error_type = message, param, code, status, error_type

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(
    message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def validation_error(errors: Sequence[dict[str, Any]]) -> RequestError:
    """Turn FastAPI's validation errors (pydantic's, or a JSON decode error) into one 400 naming the first field."""
    first = errors[0]
    location = [part for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return RequestError(f"The request body is not valid JSON ({detail} at position {location[0]}).")
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    message = str(first["msg"]).removeprefix("Value error, ")
    return RequestError(f"{param or 'request body'}: {message}", param or None)


def _string_or_strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


class ChatMessage(BaseModel):
    """One message of a chat request; `content` is normalised to a string (text parts joined)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in value
        ):
            return "".join(part["text"] for part in value)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')


class StreamOptions(BaseModel):
    """`stream_options` of a streaming request."""

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completion requests."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None or _string_or_strings(value):
            return value
        raise ValueError("must be a string or a list of strings")

    def requested_tokens(self) -> int | None:
        """The completion length the client asked for, if any."""
        return self.max_tokens

    def stop_strings(self) -> list[str]:
        """The stop sequences as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(GenerationRequest):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def requested_tokens(self) -> int | None:
        """max_completion_tokens (the current name) or max_tokens (the deprecated one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(GenerationRequest):
    """Body of POST /v1/completions."""

    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if _string_or_strings(value):
            return value
        raise ValueError("must be a string or a list of one string (token id lists are not supported)")

    def prompt_text(self) -> str:
        """The single prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def check_request(request: GenerationRequest) -> None:
    """Raise RequestError for values OpenAI's API would reject, or that this server cannot honour."""
    if request.n not in (None, 1):
        raise RequestError(f"n: {request.n} is not supported; this server returns one choice per request (n=1).", "n")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise RequestError(f"temperature: {request.temperature} is outside [0, 2].", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise RequestError(f"top_p: {request.top_p} is outside (0, 1].", "top_p")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name, None)
        if value is not None and value < 1:
            raise RequestError(f"{name}: {value} must be at least 1.", name)
    if any(not stop for stop in request.stop_strings()):
        raise RequestError("stop: stop sequences must not be empty strings.", "stop")
    for name, value in (request.model_extra or {}).items():
        if name in UNSUPPORTED_FIELDS and value not in UNSUPPORTED_FIELDS[name]:
            raise RequestError(f"{name}: not supported by this server; leave it out.", name)
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise RequestError(
            f"prompt: a list of {len(request.prompt)} prompts is not supported; send one prompt per request.", "prompt"
        )


def new_id(kind: str) -> str:
    """A fresh response id: chatcmpl-... for chat, cmpl-... for text completions."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    kind: Literal["chat", "text"], response_id: str, model: str, text: str, finish_reason: str, usage_: dict
) -> dict[str, Any]:
    """A complete (non-streamed) chat.completion or text_completion object."""
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": response_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }


def chunk(
    kind: Literal["chat", "text"],
    response_id: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    with_usage: bool = False,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk (chat.completion.chunk or text_completion) carrying `text` or a finish reason. With
    `with_usage` (stream_options.include_usage) it has "usage": null, as OpenAI's chunks then do."""
    if kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    body = {
        "id": response_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(kind: Literal["chat", "text"], response_id: str, model: str, usage_: dict) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    body = chunk(kind, response_id, model, None)
    body["choices"] = []
    body["usage"] = usage_
    return body


def model_object(model_id: str, created: int) -> dict[str, Any]:
    """One entry of /v1/models."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "hfpipe"}
