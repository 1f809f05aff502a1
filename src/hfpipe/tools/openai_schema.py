"""OpenAI API shapes for `hfpipe serve`: the request bodies of /v1/chat/completions and /v1/completions (pydantic
models plus the checks pydantic cannot express), and the JSON of responses, stream chunks, models and errors, built
from the `openai` package's own types so that unmodified OpenAI clients can parse them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # the openai package loads with the first response: `hfpipe serve --help` stays fast
    from openai.types import CompletionChoice, CompletionUsage
    from openai.types.chat.chat_completion import Choice as ChatChoice
    from openai.types.chat.chat_completion import ChoiceLogprobs
    from openai.types.completion_choice import Logprobs

# What this server answers; named in every "not supported" error so that the client knows what it can use.
SUPPORTED_ENDPOINTS = "POST /v1/chat/completions, POST /v1/completions, GET /v1/models and GET /v1/models/{model}"
TOOLS_UNSUPPORTED = (
    "Tool calling is not supported by hfpipe serve: it generates plain text. Send messages with text content "
    "(roles system, developer, user, assistant) and no tools, tool_calls or tool messages."
)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (its legacy completions allowed 5)
MAX_CHOICES = 128  # prompts x n in one request: each choice is a row of the decoding batch

# Request fields we cannot honour, with the value that means "not used"; any other value is a 400, not silently
# ignored. Fields not listed here and not modelled below (user, metadata, store, ...) are ignored.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}
TOOL_FIELDS: dict[str, Any] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
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


def unsupported_endpoint(method: str, path: str) -> RequestError:
    """The 404 for a route this server does not have, naming the ones it has (embeddings and the Responses API get
    a sentence of their own: clients try them first)."""
    if path.rstrip("/").startswith("/v1/embeddings"):
        what = "Embeddings (/v1/embeddings) are not supported by hfpipe serve: it serves a causal LM for generation."
    elif path.rstrip("/").startswith("/v1/responses"):
        what = "The Responses API (/v1/responses) is not supported by hfpipe serve; use /v1/chat/completions."
    else:
        what = f"{method} {path} is not an endpoint of hfpipe serve."
    return RequestError(f"{what} Supported: {SUPPORTED_ENDPOINTS}.", code="unsupported_endpoint", status=404)


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


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value)
    )


class ChatMessage(BaseModel):
    """One message of a chat request; `content` is normalised to a string (text parts joined)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @model_validator(mode="before")
    @classmethod
    def _refuse_tools(cls, value: Any) -> Any:
        # before the field checks: an assistant tool call has content null, which would be a confusing error
        if isinstance(value, dict) and (
            value.get("role") in ("tool", "function") or value.get("tool_calls") or value.get("function_call")
        ):
            raise ValueError(TOOLS_UNSUPPORTED)
        return value

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

    def choices_per_prompt(self) -> int:
        """n, the number of choices generated for each prompt."""
        return self.n or 1

    def top_logprobs_count(self) -> int | None:
        """How many alternatives to report at each token when log-probs are asked for (0: only the token's own),
        None when they are not."""
        return None

    def echoes(self) -> bool:
        """Whether the prompt is returned (and scored) before the completion."""
        return False


class ChatCompletionRequest(GenerationRequest):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def requested_tokens(self) -> int | None:
        """max_completion_tokens (the current name) or max_tokens (the deprecated one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """top_logprobs (default 0) when logprobs is true."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    """Body of POST /v1/completions: `prompt` is a string, a list of strings, a list of token ids or a list of
    token-id lists (as lm-evaluation-harness sends them)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        if _string_or_strings(value) or _token_ids(value):
            return value
        if isinstance(value, list) and all(_token_ids(item) for item in value):
            return value
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of token-id lists "
            "(token ids are non-negative integers, lists non-empty)"
        )

    @field_validator("logprobs", mode="before")
    @classmethod
    def _check_logprobs(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would take True as 1: the chat API's boolean sent to the wrong place
            raise ValueError(f"must be an integer (how many top log-probs per token, 0 to {MAX_TOP_LOGPROBS})")
        return value

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]

    def top_logprobs_count(self) -> int | None:
        """logprobs: how many alternatives per token (None: no log-probs)."""
        return self.logprobs

    def echoes(self) -> bool:
        """echo: the prompt comes back before the completion, its tokens scored."""
        return bool(self.echo)


def check_request(request: GenerationRequest) -> None:
    """Raise RequestError for values OpenAI's API would reject, or that this server cannot honour."""
    for name, value in (request.model_extra or {}).items():
        if name in TOOL_FIELDS and value not in TOOL_FIELDS[name]:
            raise RequestError(TOOLS_UNSUPPORTED, name, "unsupported_parameter")
        if name in UNSUPPORTED_FIELDS and value not in UNSUPPORTED_FIELDS[name]:
            raise RequestError(f"{name}: not supported by this server; leave it out.", name)
    if request.n is not None and request.n < 1:
        raise RequestError(f"n: {request.n} must be at least 1.", "n")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise RequestError(f"temperature: {request.temperature} is outside [0, 2].", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise RequestError(f"top_p: {request.top_p} is outside (0, 1].", "top_p")
    # max_tokens 0 with echo scores the prompt and generates nothing (OpenAI's legacy API allowed it)
    lowest = 0 if request.echoes() else 1
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name, None)
        if value is not None and value < lowest:
            raise RequestError(f"{name}: {value} must be at least {lowest}.", name)
    if any(not stop for stop in request.stop_strings()):
        raise RequestError("stop: stop sequences must not be empty strings.", "stop")
    _check_logprobs(request)
    prompts = len(request.prompts()) if isinstance(request, CompletionRequest) else 1
    if prompts * request.choices_per_prompt() > MAX_CHOICES:
        raise RequestError(
            f"{prompts} prompt(s) x n={request.choices_per_prompt()} is more than {MAX_CHOICES} choices in one "
            "request; split it.",
            "n" if prompts == 1 else "prompt",
        )


def _check_logprobs(request: GenerationRequest) -> None:
    if isinstance(request, ChatCompletionRequest):
        name, count = "top_logprobs", request.top_logprobs
        if count is not None and count > 0 and not request.logprobs:
            raise RequestError("top_logprobs: requires logprobs: true.", name)
    else:
        name, count = "logprobs", request.top_logprobs_count()
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise RequestError(f"{name}: {count} is outside [0, {MAX_TOP_LOGPROBS}].", name)
    if request.stream and (request.top_logprobs_count() is not None or request.echoes()):
        what = "echo" if request.echoes() else "logprobs"
        raise RequestError(f"{what}: not supported with stream: true; send the request without streaming.", what)


def new_id(kind: str) -> str:
    """A fresh response id: chatcmpl-... for chat, cmpl-... for text completions."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    """The usage object."""
    from openai.types import CompletionUsage

    return CompletionUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def chat_choice(index: int, text: str, finish_reason: str, logprobs: ChoiceLogprobs | None = None) -> ChatChoice:
    """One choice of a chat.completion."""
    from openai.types.chat import ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice as ChatChoice

    message = ChatCompletionMessage(role="assistant", content=text, refusal=None)
    return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason)


def completion_choice(index: int, text: str, finish_reason: str, logprobs: Logprobs | None = None) -> CompletionChoice:
    """One choice of a text_completion. `Logprobs` is built with `construct`: its lists hold null for the first
    echoed token, as OpenAI's do, which the type does not declare."""
    from openai.types import CompletionChoice

    return CompletionChoice.construct(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)


def response(
    kind: Literal["chat", "text"],
    response_id: str,
    model: str,
    choices: Sequence[ChatChoice | CompletionChoice],
    usage_: CompletionUsage,
) -> dict[str, Any]:
    """A complete (non-streamed) chat.completion or text_completion object."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    fields = {"id": response_id, "created": int(time.time()), "model": model, "choices": list(choices)}
    if kind == "chat":
        body: Any = ChatCompletion(object="chat.completion", usage=usage_, **fields)
    else:
        body = Completion.construct(object="text_completion", usage=usage_, **fields)
    return body.to_dict(mode="json")


def chunk(
    kind: Literal["chat", "text"],
    response_id: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    with_usage: bool = False,
    first: bool = False,
    index: int = 0,
) -> dict[str, Any]:
    """One streamed chunk (chat.completion.chunk or text_completion) of choice `index`, carrying `text` or a finish
    reason. With `with_usage` (stream_options.include_usage) it has "usage": null, as OpenAI's chunks then do."""
    from openai.types import Completion, CompletionChoice
    from openai.types.chat import ChatCompletionChunk
    from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
    from openai.types.chat.chat_completion_chunk import ChoiceDelta

    fields: dict[str, Any] = {"id": response_id, "created": int(time.time()), "model": model}
    if with_usage:
        fields["usage"] = None
    if kind == "chat":
        delta_fields = {"content": text} if text is not None else {}
        delta = ChoiceDelta(**delta_fields, **({"role": "assistant"} if first else {}))
        choice = ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=finish_reason)
        return ChatCompletionChunk(object="chat.completion.chunk", choices=[choice], **fields).to_dict(mode="json")
    text_choice = CompletionChoice.construct(index=index, text=text or "", logprobs=None, finish_reason=finish_reason)
    return Completion.construct(object="text_completion", choices=[text_choice], **fields).to_dict(mode="json")


class TextChunks:
    """The text chunks of one choice of a stream: one `chunk` built from the openai types and serialized once; each
    chunk then only splices in its text (a stream sends one per token)."""

    _MARK = "\x00hfpipe-text\x00"  # cannot occur in an id or a model name

    def __init__(self, kind: Literal["chat", "text"], response_id: str, model: str, with_usage: bool, index: int):
        body = json.dumps(chunk(kind, response_id, model, self._MARK, with_usage=with_usage, index=index))
        self._head, self._tail = body.split(json.dumps(self._MARK))

    def body(self, text: str) -> str:
        """The chunk carrying `text`, as JSON."""
        return f"{self._head}{json.dumps(text)}{self._tail}"


def usage_chunk(kind: Literal["chat", "text"], response_id: str, model: str, usage_: CompletionUsage) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    body = chunk(kind, response_id, model, None)
    body["choices"] = []
    body["usage"] = usage_.to_dict(mode="json")
    return body


def model_object(model_id: str, created: int) -> dict[str, Any]:
    """One entry of /v1/models."""
    from openai.types import Model

    return Model(id=model_id, object="model", created=created, owned_by="hfpipe").to_dict(mode="json")
