"""Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions and /v1/models, with
streaming as server-sent events, so that the openai client, LangChain or Semantic Kernel can talk to it.

  hfpipe serve outputs/quickstart/sft --port 8000
  then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(model="sft", ...)

Requests name the served model id (--model-id, default the model dir's name; --lora NAME=DIR adds LoRA adapters of
the same base under their own ids); any other id is a 404 model_not_found, as with OpenAI. Chat messages are
rendered with the tokenizer's chat template, or without one in hfpipe's '### Instruction:' layout. Decoding is greedy
unless the request sets a temperature above 0 or a top_p. Completions take a prompt list (strings or token ids),
`n`, `logprobs` and `echo` (what lm-evaluation-harness's local-completions model sends); chat takes `n`, `logprobs`
and `top_logprobs`. Tool calls, /v1/embeddings, /v1/responses and unknown routes get an OpenAI-shaped error naming
what is supported. Answers are continuously batched: a request that arrives while others decode joins them at the
next step (--max-batch-size rows; 1 answers one at a time). On SIGTERM or Ctrl+C, waiting requests get a 503, the
running answers get 5 s to finish (then they are cut: a 503, or an error event in a stream), and the server exits
with code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hfpipe.errors import ConfigError
from hfpipe.rundir import model_or_latest_run
from hfpipe.tools.decoding import check_sampling_values
from hfpipe.tools.model_flags import add_model_argument, add_model_flags

# At module level (pydantic only, no torch): FastAPI resolves a route's (string) annotations in these globals.
from hfpipe.tools.openai_schema import (
    SUPPORTED_ENDPOINTS,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    RequestError,
    TextChunks,
    check_request,
    chunk,
    error_body,
    model_object,
    new_id,
    response,
    unsupported_endpoint,
    usage_chunk,
    validation_error,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from uvicorn import Config

    from hfpipe.models.trained import LoadedModel
    from hfpipe.tools.serve_adapters import Served
    from hfpipe.tools.serve_worker import Engine, RowStream

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_BATCH_SIZE = 16  # rows (choices) of one generate call
GENERATION_GRACE_SECONDS = 5  # after SIGTERM the running generation may finish within this; then it is cut
# uvicorn cancels requests still open this long after SIGTERM (with tracebacks); the cut above comes first
GRACEFUL_SHUTDOWN_SECONDS = GENERATION_GRACE_SECONDS + 5
logger = logging.getLogger("uvicorn.error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe serve`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_argument(parser, optional=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--model-id", help="the model id clients send and /v1/models lists (default: the dir's name)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"new tokens when a request sets no max_tokens (default: {DEFAULT_MAX_NEW_TOKENS}, within the context)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="answers decoded together at most: a request that arrives while others decode joins them at the next "
        f"step (default: {DEFAULT_MAX_BATCH_SIZE}; 1: one answer at a time)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME=DIR",
        help="also serve the LoRA adapter in DIR, trained on MODEL, as the model id NAME (repeatable; one base in "
        "memory, requests choose by their model field)",
    )
    add_model_flags(parser)


def check_args(args: argparse.Namespace) -> None:
    """Validate the flags before anything is loaded; the port must be free."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be between 1 and 65535.")
    check_sampling_values(max_new_tokens=args.max_new_tokens)
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size {args.max_batch_size}: must be at least 1.")
    if args.model_id is not None and not args.model_id.strip():
        raise ConfigError("--model-id: must not be empty.")
    from hfpipe.tools.serve_adapters import parse_lora_flags

    args.adapters = parse_lora_flags(args.lora, args.model_id)
    check_port_free(args.host, args.port)


def check_port_free(host: str, port: int) -> None:
    """Raise a ConfigError when nothing can listen on host:port (in use, or an address not on this machine)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise ConfigError(f"--host {host}: not a known address.") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror}).") from None


def default_model_id(name: str) -> str:
    """The id served when --model-id is not given: a local dir's (or .gguf file's) name, else `name` itself."""
    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        return path.stem if path.suffix == ".gguf" else path.name
    return name


def start_line(host: str, port: int, model_id: str) -> str:
    """The line printed at start: where the API is, the model id, and a request to try."""
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    return (
        f"Serving '{model_id}' at {url} (OpenAI-compatible). "
        f"Try: curl {url}/chat/completions -H 'Content-Type: application/json' -d '{body}'"
    )


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(
    loaded: LoadedModel,
    model_id: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    served: dict[str, Served] | None = None,
) -> FastAPI:
    """The FastAPI app serving `loaded` as `model_id` from this process (a LocalEngine); `max_new_tokens` applies
    to requests without max_tokens, `max_batch_size` rows at most decode together (1: one at a time). `served`
    (from serve_adapters.load_adapters) adds LoRA adapters of the same base, each under its own id."""
    from hfpipe.tools.serve_adapters import Served
    from hfpipe.tools.serve_worker import LocalEngine

    served = served or {model_id: Served(loaded)}
    return engine_app(LocalEngine(served, max_new_tokens, max_batch_size))


def engine_app(engine: Engine) -> FastAPI:
    """The FastAPI app with OpenAI's routes, generating with `engine` (its first id is the base model's). Its
    lifespan's end closes the engine."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    model_id = engine.ids[0]
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title=f"hfpipe serve {model_id}", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(error.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        message = str(error.detail)
        if error.status_code == 404:
            refusal = unsupported_endpoint(request.method, request.url.path)
            return JSONResponse(refusal.body(), status_code=404)
        if error.status_code == 405:
            message = f"{request.method} {request.url.path}: method not allowed. Supported: {SUPPORTED_ENDPOINTS}."
        return JSONResponse(error_body(message), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, error: Exception) -> JSONResponse:  # a bug: uvicorn still logs the traceback
        return JSONResponse(error_body(f"The server failed: {error}", "server_error"), status_code=500)

    def check_model(name: str) -> None:
        if name not in engine.ids:
            ids = ", ".join(f"'{served_id}'" for served_id in engine.ids)
            raise RequestError(
                f"The model '{name}' does not exist: this server serves {ids} (see /v1/models).",
                "model",
                "model_not_found",
                status=404,
            )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(served_id, created) for served_id in engine.ids]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_object(name, created)

    async def complete(kind: Literal["chat", "text"], request: GenerationRequest) -> Any:
        check_model(request.model)
        check_request(request)
        streams = await engine.submit(request.model, request)
        if request.stream:
            with_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = stream_events(streams, request, kind, request.model, with_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        return await full_response(engine, streams, request, kind, request.model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        return await complete("chat", request)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        return await complete("text", request)

    return app


async def full_response(
    engine: Engine, streams: list[RowStream], request: GenerationRequest, kind: Literal["chat", "text"], model_id: str
) -> dict:
    """Collect every choice's rows and return them as one chat.completion or text_completion object."""
    from hfpipe.tools.serve_responses import choices, collect, total_usage

    answers = await collect(streams)
    finishes = [answer.finish for answer in answers]
    return response(
        kind,
        new_id(kind),
        model_id,
        choices(kind, request, engine.tokenizer, answers),
        total_usage(finishes, request.choices_per_prompt()),
    )


async def stream_events(
    streams: list[RowStream],
    request: GenerationRequest,
    kind: Literal["chat", "text"],
    model_id: str,
    with_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of one streamed answer: chunks as OpenAI sends them (each choice's, interleaved, with its
    index), then `data: [DONE]`. A failure after the stream has started is sent as an error event."""
    from hfpipe.tools.serve_responses import merge, total_usage

    response_id = new_id(kind)
    finishes: dict[int, Any] = {}
    texts = [TextChunks(kind, response_id, model_id, with_usage, index) for index in range(len(streams))]
    try:
        if kind == "chat":
            for index in range(len(streams)):
                yield sse(chunk(kind, response_id, model_id, "", with_usage=with_usage, first=True, index=index))
        async for index, item in merge(streams):
            if isinstance(item, str):
                yield sse(texts[index].body(item))
                continue
            finishes[index] = item
            yield sse(chunk(kind, response_id, model_id, None, item.finish_reason, with_usage, index=index))
        if with_usage:
            ordered = [finishes[index] for index in range(len(streams))]
            totals = total_usage(ordered, request.choices_per_prompt())
            yield sse(usage_chunk(kind, response_id, model_id, totals))
    except RequestError as error:
        yield sse(error.body())
    except Exception as error:  # the response has started: report in the stream, log the traceback
        logger.exception("generation failed")
        yield sse(error_body(f"generation failed: {error}", "server_error"))
    finally:  # the client may leave before the rows are read (the rows were queued before the response started)
        for stream in streams:
            stream.cancel()
    yield sse("[DONE]")


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_until_stopped(app: FastAPI, config: Config) -> None:
    """Run uvicorn until SIGTERM or Ctrl+C; at the signal, queued requests get a 503 and the running generation
    gets GENERATION_GRACE_SECONDS to finish, so that no request is still open when uvicorn's own timeout ends."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)
            app.state.engine.begin_shutdown(GENERATION_GRACE_SECONDS)

    # uvicorn re-raises the signal to the handler it found once it has shut down: exit 0 rather than die by the
    # signal (or print a KeyboardInterrupt traceback).
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    Server(config).run()


def check_model_args(args: argparse.Namespace) -> tuple[str, str]:
    """The model to serve (the newest finished run when none is named) and its id; the adapters' base must be it."""
    from hfpipe.tools.serve_adapters import check_adapter_bases

    name, picked = model_or_latest_run(args.model)
    if picked:
        print(f"# no model named: serving {picked}: {name}", flush=True)
    model_id = args.model_id or default_model_id(name)
    if model_id in args.adapters:
        raise ConfigError(f"--lora {model_id}=...: '{model_id}' is the base model's id; name the adapter otherwise.")
    check_adapter_bases(name, args.adapters)
    return name, model_id


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe serve`: check the flags, load the model in its own process, serve until SIGTERM or Ctrl+C."""
    check_args(args)
    from hfpipe.tools.serve_process import EngineSpec, ProcessEngine

    engine = ProcessEngine()  # it imports torch and transformers while this process checks the model
    try:
        name, model_id = check_model_args(args)
        from hfpipe.models.trained import check_model_source, load_inference_tokenizer

        path = check_model_source(name)
        spec = EngineSpec(
            name, model_id, args.adapters, args.dtype, args.device, args.trust_remote_code, args.max_new_tokens,
            args.max_batch_size,
        )  # fmt: skip
        engine.load(spec, load_inference_tokenizer(path, args.trust_remote_code))
    except BaseException:
        engine.close()
        raise
    import uvicorn

    app = engine_app(engine)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, log_level="info"
    )
    print(start_line(args.host, args.port, model_id), flush=True)
    if len(engine.ids) > 1:
        print(f"# also serving LoRA adapters: {', '.join(engine.ids[1:])}", flush=True)
    serve_until_stopped(app, config)
