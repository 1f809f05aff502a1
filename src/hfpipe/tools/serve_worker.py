"""The generation side of `hfpipe serve`: a request's prompts rendered as the model was trained, one job per choice
with its GenerationConfig, and one worker thread that decodes the queued jobs continuously batched: a request that
arrives while others decode joins them at the next step, up to a maximum batch size (1: one answer at a time).
An Engine is what the HTTP routes talk to: LocalEngine runs all this in the server's process, ProcessEngine
(serve_process) in a process of its own."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from jinja2 import TemplateError
from transformers import GenerationConfig, PreTrainedTokenizerBase

from hfpipe.models.trained import LoadedModel
from hfpipe.tools.decoding import build_generation_config
from hfpipe.tools.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
    RequestError,
)
from hfpipe.tools.prompts import context_length, encode_prompt, render_chat_prompt
from hfpipe.tools.serve_adapters import Served
from hfpipe.tools.serve_batch import CUT, ContinuousBatch, Finish, Job, Row

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer clients send "developer" where older ones send "system"


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[int]:
    """Token ids of a chat prompt, rendered as `hfpipe chat` renders it: the tokenizer's chat template with the
    generation prompt, or without a template the '### Instruction:' layout hfpipe's SFT trains on."""
    conversation = [
        {"role": "system" if message.role in SYSTEM_ROLES else message.role, "content": message.content}
        for message in messages
    ]
    try:
        text = render_chat_prompt(tokenizer, conversation)
    except TemplateError as error:  # templates raise on conversations they cannot render (roles out of order)
        raise RequestError(f"messages: the model's chat template cannot render them: {error}", "messages") from None
    return encode_prompt(tokenizer, text, "chat" if tokenizer.chat_template else "instruction")


def completion_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a raw text prompt; an empty prompt starts a new document (BOS, else EOS)."""
    ids = encode_prompt(tokenizer, prompt, "raw") if prompt else []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ids or [start]


def checked_token_ids(loaded: LoadedModel, ids: list[int], param: str) -> list[int]:
    """A prompt given as token ids, refused when an id is outside the model's vocabulary."""
    size = loaded.model.get_input_embeddings().num_embeddings
    if bad := [token for token in ids if token >= size]:
        raise RequestError(f"{param}: token id {bad[0]} is outside the model's vocabulary (0 to {size - 1}).", param)
    return ids


def completion_budget(prompt_tokens: int, requested: int | None, default: int, context: int | None, param: str) -> int:
    """The number of new tokens to generate; a prompt that leaves no room, or an explicit request beyond the
    context, is a 400 with the token counts (OpenAI's context_length_exceeded)."""
    if context is None:
        return default if requested is None else requested
    if prompt_tokens >= context and requested != 0:
        raise RequestError(
            f"This model's maximum context length is {context} tokens, and the prompt has {prompt_tokens} tokens. "
            "Shorten the prompt.",
            param,
            "context_length_exceeded",
        )
    if requested is not None and prompt_tokens + requested > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion). "
            "Shorten the prompt or lower max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return min(default, context - prompt_tokens) if requested is None else requested


def generation_config_for(loaded: LoadedModel, request: GenerationRequest, max_new_tokens: int) -> GenerationConfig:
    """The request's GenerationConfig, built as `hfpipe generate` builds one: a temperature above 0, or a top_p
    without a temperature, samples; temperature 0, or neither field, decodes greedily. Sampling applies no top-k
    unless the model's generation_config.json sets one (OpenAI's API has none)."""
    greedy = request.temperature == 0
    sampling = not greedy and (request.temperature is not None or request.top_p is not None)
    model_top_k = getattr(loaded.model.generation_config, "top_k", None)
    return build_generation_config(
        loaded.model,
        loaded.tokenizer,
        max_new_tokens=max(max_new_tokens, 1),  # 0 (echo only) never decodes
        do_sample=False if greedy else None,
        temperature=None if greedy else request.temperature,
        top_p=None if greedy else request.top_p,
        top_k=0 if sampling and model_top_k is None else None,
    )


def request_prompts(loaded: LoadedModel, request: GenerationRequest) -> tuple[list[list[int]], str]:
    """The token ids of each prompt of a request, and the request field they come from."""
    if isinstance(request, ChatCompletionRequest):
        return [chat_prompt_ids(loaded.tokenizer, request.messages)], "messages"
    assert isinstance(request, CompletionRequest)
    prompts = request.prompts()
    return [
        completion_prompt_ids(loaded.tokenizer, prompt)
        if isinstance(prompt, str)
        else checked_token_ids(loaded, prompt, "prompt")
        for prompt in prompts
    ], "prompt"


def prepare_jobs(
    loaded: LoadedModel,
    request: GenerationRequest,
    default_max_new_tokens: int,
    adapter: str | None = None,
    eos_token_id: int | list[int] | None = None,
) -> list[Job]:
    """One job per choice, in choice order (prompt by prompt, n choices each), decoding with the LoRA `adapter`
    and stopping at `eos_token_id` when given; RequestError when a prompt does not fit the model's context. With a
    seed, sampled choice j of each prompt draws from seed + j."""
    prompts, param = request_prompts(loaded, request)
    jobs = []
    for prompt_ids in prompts:
        budget = completion_budget(
            len(prompt_ids), request.requested_tokens(), default_max_new_tokens, context_length(loaded.model), param
        )
        config = generation_config_for(loaded, request, budget)
        if eos_token_id is not None:
            config.eos_token_id = eos_token_id
        for choice in range(request.choices_per_prompt()):
            seed = None if request.seed is None else request.seed + choice
            jobs.append(
                Job(
                    prompt_ids,
                    config,
                    budget,
                    seed,
                    request.stop_strings(),
                    request.top_logprobs_count(),
                    request.echoes(),
                    adapter,
                )
            )
    return jobs


class StopFilter:
    """Cut streamed text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Take the next piece of text; return what can be sent now."""
        if self.stopped:
            return ""
        self.pending += piece
        found = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if found:
            self.stopped = True
            return self.pending[: min(found)]
        hold = max(
            (size for stop in self.stops for size in range(1, len(stop)) if self.pending.endswith(stop[:size])),
            default=0,
        )
        text, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return text

    def flush(self) -> str:
        """The held-back text at the end of the generation."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text


SHUTTING_DOWN = "The server is shutting down; retry later."


class Outbox:
    """What the worker thread's rows push, held and handed to `deliver` all at once, in order, once per decoding
    step: one wake-up of the receiver (an event loop, the pipe to the server) per step rather than one per row and
    token."""

    def __init__(self, deliver: Callable[[list[Any]], None]) -> None:
        self._deliver = deliver
        self._items: list[Any] = []
        self._lock = threading.Lock()

    def put(self, item: Any) -> None:
        """Hold `item` until the next flush."""
        with self._lock:
            self._items.append(item)

    def flush(self) -> None:
        """Deliver what is held, in order."""
        with self._lock:
            items, self._items = self._items, []
        if items:
            self._deliver(items)


def post(items: Iterable[tuple[asyncio.AbstractEventLoop, RowStream, Any]]) -> None:
    """Hand each item to its stream, in order, on the stream's event loop: one wake-up per loop (from any thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RowStream, Any]]] = {}
    for loop, stream, item in items:
        by_loop.setdefault(loop, []).append((stream, item))
    for loop, deliveries in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[tuple[RowStream, Any]]) -> None:
    for stream, item in deliveries:
        stream.deliver(item)


class RowStream:
    """The request side of a row: its text (stop sequences cut out), then its Finish. Whoever decodes the row
    delivers its items with `deliver`, on the stream's event loop; `cancel` tells the decoder to stop it."""

    def __init__(self, stops: list[str], cancel: Callable[[], None]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stops, self._cancel = stops, cancel

    def deliver(self, item: Any) -> None:
        """Hand the stream its next item: text, its Finish, or an error (called on the stream's event loop)."""
        self._queue.put_nowait(item)

    def cancel(self) -> None:
        """Stop the row at its next token (or before it starts): the client is gone."""
        self._cancel()

    async def __aiter__(self) -> AsyncIterator[str | Finish]:
        stops = StopFilter(self.stops)
        held = None
        try:
            while True:
                item, held = (held, None) if held is not None else (await self._queue.get(), None)
                if isinstance(item, str):
                    # text that piled up while the event loop was busy goes out as one chunk
                    while held is None and not self._queue.empty():
                        following = self._queue.get_nowait()
                        if isinstance(following, str):
                            item += following
                        else:
                            held = following
                    if text := stops.feed(item):
                        yield text
                    continue
                if isinstance(item, BaseException):
                    raise item
                if text := stops.flush():
                    yield text
                if item.finish_reason == CUT:
                    raise RequestError(SHUTTING_DOWN, status=503, error_type="server_error")
                yield item
                return
        finally:
            self.cancel()  # reached early when the client disconnects


JOIN_WAIT_STEPS = 4


def joins_now(running: int, queued: int, waited: int, max_batch_size: int) -> bool:
    """Whether the queued rows join the batch at this step: at once while it is less than half full, when two or
    more are queued, or when the first has waited JOIN_WAIT_STEPS steps. Otherwise a lone newcomer waits for
    company: a prefill's forward pass costs about a decoding step whether it holds one prompt or two, and at 16
    clients one came every 2-3 steps (+2% to +11% tokens/s on the quickstart model, a few steps more to the first
    token)."""
    return running * 2 < max_batch_size or queued >= 2 or waited >= JOIN_WAIT_STEPS


class ModelWorker:
    """Decodes the queued rows on one thread, continuously batched: rows join the running batch (at most
    `max_batch_size` rows) in arrival order when there is room (see joins_now), and leave it the step they end."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, outbox: Outbox) -> None:
        self.loaded, self.max_batch_size = loaded, max_batch_size
        self._pending: deque[Row] = deque()
        self._outbox = outbox  # where the rows push their items; flushed after each step
        self._batch = ContinuousBatch(loaded, max_batch_size)
        self._wake = threading.Condition()
        self._stopping = self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hfpipe-generate", daemon=True)
        self._thread.start()

    def enqueue(self, rows: list[Row]) -> None:
        """Queue rows to decode; a 503 once shutdown has begun."""
        with self._wake:
            if self._stopping:
                raise RequestError(SHUTTING_DOWN, status=503, error_type="server_error")
            self._pending.extend(rows)
            self._wake.notify()

    def _loop(self) -> None:
        batch = self._batch
        waited = 0  # steps the first queued row has waited for company
        while True:
            with self._wake:
                while not self._pending and not batch.rows and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for decoding in batch.rows:
                        decoding.row.reason = CUT
                        decoding.row.finish()
                    self._outbox.flush()
                    return
                if self._pending and not joins_now(len(batch.rows), len(self._pending), waited, self.max_batch_size):
                    waited, joining = waited + 1, []
                else:
                    waited, joining = 0, self._take(batch.room())
            try:
                if joining:
                    batch.join(joining)
                    self._outbox.flush()  # first tokens out before the next step
                if batch.rows:
                    batch.step()
            except Exception as error:  # a failed forward pass: its rows get the error, the worker carries on
                for row in joining:
                    row.fail(error)
                batch.fail(error)
            self._outbox.flush()

    def _take(self, count: int) -> list[Row]:
        rows = []
        while self._pending and len(rows) < count:
            row = self._pending.popleft()
            if not row.cancel.is_set():
                rows.append(row)
        return rows

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Answer queued requests with 503 now; let the running rows finish within `grace_seconds`, then stop them
        at their next token (503, or an error event in a stream)."""
        with self._wake:
            self._stopping = True
            self._refuse_pending()
        self._outbox.flush()
        timer = threading.Timer(grace_seconds, self._batch.cancel_all)
        timer.daemon = True
        timer.start()

    def _refuse_pending(self) -> None:
        for row in self._pending:
            row.reason = CUT
            row.finish()
        self._pending.clear()

    def close(self) -> None:
        """Stop the running rows at their next token, answer queued rows with 503, and end the worker thread."""
        with self._wake:
            self._stopping = self._closed = True
            self._refuse_pending()
            self._wake.notify()
        self._thread.join()
        self._outbox.flush()


def served_jobs(served: dict[str, Served], model_id: str, request: GenerationRequest, max_new_tokens: int) -> list[Job]:
    """The jobs of a request for the served id `model_id` (its tokenizer, its adapter, its EOS)."""
    target = served[model_id]
    return prepare_jobs(target.loaded, request, max_new_tokens, target.adapter, target.eos_token_id)


class Engine(Protocol):
    """What the HTTP routes of `hfpipe serve` generate with: the served ids, and each request's rows as streams."""

    ids: list[str]  # the served model ids, the base's first
    tokenizer: PreTrainedTokenizerBase  # the base's: for log-prob token texts and token-id prompts

    async def submit(self, model_id: str, request: GenerationRequest) -> list[RowStream]:
        """Prepare a request's jobs and queue them; their streams in choice order. RequestError when refused."""
        ...

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Refuse queued and new requests (503); cut the running rows after `grace_seconds`."""
        ...

    def close(self) -> None:
        """Stop generating and release the model."""
        ...


class LocalEngine:
    """The Engine in this process: requests are prepared on the event loop, rows decode on a ModelWorker thread
    (both share this process's GIL; `hfpipe serve` runs serve_process.ProcessEngine instead)."""

    def __init__(self, served: dict[str, Served], max_new_tokens: int, max_batch_size: int) -> None:
        self.served, self.max_new_tokens = served, max_new_tokens
        base = next(iter(served.values())).loaded
        self.ids, self.tokenizer = list(served), base.tokenizer
        self._outbox = Outbox(post)  # items as (event loop, stream, item)
        self.worker = ModelWorker(base, max_batch_size, self._outbox)

    async def submit(self, model_id: str, request: GenerationRequest) -> list[RowStream]:
        """Prepare a request's jobs and queue them; their streams in choice order. RequestError when refused."""
        loop = asyncio.get_running_loop()
        streams, rows = [], []
        for job in served_jobs(self.served, model_id, request, self.max_new_tokens):
            cancel = threading.Event()
            stream = RowStream(job.stops, cancel.set)
            rows.append(Row(job, functools.partial(self._hold, loop, stream), cancel))
            streams.append(stream)
        self.worker.enqueue(rows)
        return streams

    def _hold(self, loop: asyncio.AbstractEventLoop, stream: RowStream, item: Any) -> None:
        self._outbox.put((loop, stream, item))

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Refuse queued and new requests (503); cut the running rows after `grace_seconds`."""
        self.worker.begin_shutdown(grace_seconds)

    def close(self) -> None:
        """Stop generating and end the worker thread."""
        self.worker.close()
