"""The model of `hfpipe serve` in a process of its own, so that decoding does not share a GIL with the HTTP server.

In one process the decoding thread and the event loop take turns on the GIL: at 16 clients the server ran on about
one core and gave half of what its batching loop gives without HTTP. Here the HTTP process parses requests, writes
the streamed events and keeps only the tokenizer. The model process (started with `spawn`, which is safe with CUDA)
imports torch while the server checks the flags and the model, then loads the model and its adapters, prepares each
request's jobs and decodes them in a ModelWorker. They talk over one pipe:

  server -> model:  (LOAD, EngineSpec) once · (SUBMIT, request id, model id, request) · (CANCEL, row key) ·
                    (SHUTDOWN, grace s) · (CLOSE,)
  model -> server:  (READY,) or (FAILED, UserError) once · (ACCEPTED, request id, stops per row) or
                    (REFUSED, request id, RequestError) per request · (ROWS, [(row key, item), ...]) per decoding
                    step · (CLOSED,) at the end

A row key is (request id, row index); an item is text, a Finish or an error, as a LocalEngine's rows push them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from hfpipe.errors import UserError
from hfpipe.tools.openai_schema import GenerationRequest, RequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hfpipe.tools.serve_adapters import Served
    from hfpipe.tools.serve_batch import Row
    from hfpipe.tools.serve_worker import RowStream

LOAD, READY, FAILED, SUBMIT, ACCEPTED, REFUSED, ROWS, CANCEL, SHUTDOWN, CLOSE, CLOSED = (
    "load", "ready", "failed", "submit", "accepted", "refused", "rows", "cancel", "shutdown", "close", "closed"
)  # fmt: skip
RowKey = tuple[int, int]
STOPPED = "The model process has stopped; restart the server."


@dataclass(frozen=True)
class EngineSpec:
    """What the model process loads and how it decodes: the arguments of load_for_inference and load_adapters."""

    model: str  # the loadable form (check_model_source)
    model_id: str
    adapters: dict[str, str]  # --lora NAME=DIR
    dtype: str | None
    device: str | None
    trust_remote_code: bool
    max_new_tokens: int
    max_batch_size: int


class ProcessEngine:
    """The Engine of `hfpipe serve`: the model decodes in a child process; this side routes each row's items from
    the pipe to its stream, on the stream's event loop."""

    def __init__(self) -> None:
        """Start the model process: it imports torch and transformers, then waits for `load`."""
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=run_model_process, args=(child,), name="hfpipe-model", daemon=True)
        self._process.start()
        child.close()
        self.ids: list[str] = []
        self.tokenizer: PreTrainedTokenizerBase | None = None
        # sends go through one thread: begin_shutdown runs in a signal handler, which must not wait for a lock
        self._outgoing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="hfpipe-model-requests", daemon=True)
        self._sender.start()
        self._request_ids = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[list[RowStream]]]] = {}
        self._streams: dict[RowKey, tuple[asyncio.AbstractEventLoop, RowStream]] = {}
        self._reader: threading.Thread | None = None
        self._stopped = False  # the model process has gone

    def load(self, spec: EngineSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        """Load the model in its process and wait until it is ready; its UserError (a bad adapter, ...) is raised
        here. `tokenizer` is the base model's, for the answers' log-prob token texts and token-id prompts."""
        self.ids, self.tokenizer = [spec.model_id, *spec.adapters], tokenizer
        self._outgoing.put((LOAD, spec))
        try:
            message = self._connection.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the model process exited while loading (exit code {self._process.exitcode})") from None
        if message[0] == FAILED:
            self._process.join()
            raise message[1]
        self._reader = threading.Thread(target=self._read, name="hfpipe-model-events", daemon=True)
        self._reader.start()

    async def submit(self, model_id: str, request: GenerationRequest) -> list[RowStream]:
        """Send a request to the model process; its rows' streams once it has prepared them (RequestError if not)."""
        loop = asyncio.get_running_loop()
        request_id = next(self._request_ids)
        accepted: asyncio.Future[list[RowStream]] = loop.create_future()
        self._waiting[request_id] = (loop, accepted)
        if self._stopped:  # the reader has failed what was waiting; this one came after
            self._waiting.pop(request_id, None)
        self._send((SUBMIT, request_id, model_id, request))
        return await accepted

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Refuse queued and new requests (503); cut the running rows after `grace_seconds`."""
        self._outgoing.put((SHUTDOWN, grace_seconds))

    def close(self) -> None:
        """Stop the model process: running rows are cut, queued ones refused; wait for it to exit. Before the model
        has loaded (a bad flag or model), the process is just stopped."""
        self._outgoing.put((CLOSE,))
        self._outgoing.put(None)
        if self._reader is not None:
            self._reader.join(timeout=30)
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _send(self, message: tuple) -> None:
        if self._reader is None or self._stopped:
            raise RequestError(STOPPED, status=503, error_type="server_error")
        self._outgoing.put(message)

    def _send_all(self) -> None:
        while (message := self._outgoing.get()) is not None:
            try:
                self._connection.send(message)
            except OSError:
                return  # the model process is gone; the reader fails what is open

    def _cancel(self, key: RowKey) -> None:
        if key in self._streams:  # not finished yet
            self._outgoing.put((CANCEL, key))

    def _read(self) -> None:
        """Route the model process's messages until it closes (or dies: its open requests then get a 500)."""
        from hfpipe.tools.serve_worker import RowStream, post

        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == ROWS:
                deliveries = []
                for key, item in message[1]:  # a row's last item (not text) ends its routing
                    target = self._streams.get(key) if isinstance(item, str) else self._streams.pop(key, None)
                    if target is not None:
                        deliveries.append((*target, item))
                post(deliveries)
            elif kind == ACCEPTED:
                _, request_id, stops = message
                loop, accepted = self._waiting.pop(request_id)
                streams = []
                for index, row_stops in enumerate(stops):
                    stream = RowStream(row_stops, functools.partial(self._cancel, (request_id, index)))
                    self._streams[(request_id, index)] = (loop, stream)
                    streams.append(stream)
                # a request whose client left while it was being prepared: its rows stop at once
                _resolve(loop, accepted, streams, unwanted=lambda streams=streams: [row.cancel() for row in streams])
            elif kind == REFUSED:
                loop, accepted = self._waiting.pop(message[1])
                _resolve(loop, accepted, message[2])
            elif kind == CLOSED:
                return
        self._stopped = True
        self._process.join(timeout=5)
        stopped = f"the model process stopped (exit code {self._process.exitcode})"
        logging.getLogger("uvicorn.error").error("%s: requests get 503 from now on; restart the server", stopped)
        self._fail_open(RuntimeError(stopped))

    def _fail_open(self, error: Exception) -> None:
        from hfpipe.tools.serve_worker import post

        for request_id in list(self._waiting):
            if (waiting := self._waiting.pop(request_id, None)) is not None:
                _resolve(*waiting, error)
        post((loop, stream, error) for loop, stream in list(self._streams.values()))
        self._streams.clear()


def _resolve(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, outcome: Any, unwanted: Callable[[], Any] | None = None
) -> None:
    """Settle `future` on its loop with a result, or an exception when `outcome` is one; call `unwanted` instead
    when the future was cancelled (its awaiting request has gone)."""

    def settle() -> None:
        if future.done():
            if unwanted is not None:
                unwanted()
        elif isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    if not loop.is_closed():
        loop.call_soon_threadsafe(settle)


def run_model_process(connection: Connection) -> None:
    """The model process: import, wait for the spec, load the model (a UserError goes back to the server), then
    serve the pipe."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # Ctrl+C reaches the whole process group: the server
        signal.signal(stop_signal, signal.SIG_IGN)  # stops this process (CLOSE, or its end of the pipe closing)
    from transformers.utils import logging as hf_logging

    from hfpipe.models.trained import load_for_inference
    from hfpipe.tools.serve_adapters import load_adapters
    from hfpipe.tools.serve_worker import ModelWorker  # noqa: F401  (imported while the server checks the model)

    hf_logging.disable_progress_bar()
    try:
        message = connection.recv()
    except EOFError:
        return
    if message[0] != LOAD:
        return  # closed before loading
    spec: EngineSpec = message[1]
    try:
        loaded = load_for_inference(spec.model, spec.dtype, spec.device, spec.trust_remote_code)
        served = load_adapters(loaded, spec.model_id, spec.adapters)
    except UserError as error:
        connection.send((FAILED, error))
        return
    ModelSide(served, spec, connection).run()


class ModelSide:
    """The model process's end of the pipe: prepares requests into rows for its ModelWorker, sends their items."""

    def __init__(self, served: dict[str, Served], spec: EngineSpec, connection: Connection) -> None:
        from hfpipe.tools.serve_worker import ModelWorker, Outbox

        self.served, self.spec, self.connection = served, spec, connection
        self._send_lock = threading.Lock()  # this thread and the decoding thread both send
        self._outbox = Outbox(self._send_rows)  # items as (row key, item)
        self._rows: dict[RowKey, Row] = {}
        self.worker = ModelWorker(served[spec.model_id].loaded, spec.max_batch_size, self._outbox)

    def run(self) -> None:
        """Answer the server's messages until it closes the pipe (or goes away)."""
        self._send((READY,))
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                message = (CLOSE,)  # the server is gone
            kind = message[0]
            if kind == SUBMIT:
                self._submit(*message[1:])
            elif kind == CANCEL:
                if (row := self._rows.get(message[1])) is not None:
                    row.cancel.set()
            elif kind == SHUTDOWN:
                self.worker.begin_shutdown(message[1])
            elif kind == CLOSE:
                self.worker.close()
                with contextlib.suppress(OSError):  # the server may be gone
                    self._send((CLOSED,))
                return

    def _submit(self, request_id: int, model_id: str, request: GenerationRequest) -> None:
        from hfpipe.tools.serve_batch import Row
        from hfpipe.tools.serve_worker import served_jobs

        try:
            jobs = served_jobs(self.served, model_id, request, self.spec.max_new_tokens)
        except RequestError as error:
            self._send((REFUSED, request_id, error))
            return
        keys = [(request_id, index) for index in range(len(jobs))]
        rows = [Row(job, functools.partial(self._push, key)) for key, job in zip(keys, jobs, strict=True)]
        self._rows.update(zip(keys, rows, strict=True))
        try:
            with self._send_lock:  # the rows' first items cannot overtake their ACCEPTED
                self.worker.enqueue(rows)
                self.connection.send((ACCEPTED, request_id, [job.stops for job in jobs]))
        except RequestError as error:  # shutting down
            for key in keys:
                self._rows.pop(key, None)
            self._send((REFUSED, request_id, error))

    def _push(self, key: RowKey, item: Any) -> None:
        if not isinstance(item, str):  # the row's last item
            self._rows.pop(key, None)
            if isinstance(item, BaseException) and not isinstance(item, RequestError):
                item = RuntimeError(str(item))  # any exception's message, without its (maybe unpicklable) state
        self._outbox.put((key, item))

    def _send_rows(self, items: list[tuple[RowKey, Any]]) -> None:
        with contextlib.suppress(OSError):  # the server is gone; the pipe's end closes this process
            self._send((ROWS, items))

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self.connection.send(message)
