"""`hfpipe serve` with the model in its own process (ProcessEngine, what the command runs): its answers equal the
in-process server's, refusals and load errors cross the pipe, shutdown refuses new requests, and the model side
cuts a row the server cancels."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pipe
from pathlib import Path

import openai
import pytest
from test_serve import MODEL_ID, openai_client, running_server, slowed_model

from hfpipe.errors import ConfigError
from hfpipe.models.trained import load_for_inference, load_inference_tokenizer
from hfpipe.tools.openai_schema import ChatCompletionRequest, ChatMessage
from hfpipe.tools.serve import create_app, engine_app
from hfpipe.tools.serve_adapters import Served
from hfpipe.tools.serve_batch import CUT, Finish
from hfpipe.tools.serve_process import (
    ACCEPTED,
    CANCEL,
    CLOSE,
    CLOSED,
    READY,
    ROWS,
    SUBMIT,
    EngineSpec,
    ModelSide,
    ProcessEngine,
)


def spec_for(model: Path | str, max_new_tokens: int = 8) -> EngineSpec:
    """The model process's spec for `model` served as MODEL_ID on CPU, 16 rows at most."""
    return EngineSpec(str(model), MODEL_ID, {}, None, "cpu", False, max_new_tokens, 16)


@pytest.fixture(scope="module")
def engine(tiny_gpt2_dir: Path) -> Iterator[ProcessEngine]:
    """The tiny GPT-2 loaded in a model process."""
    engine = ProcessEngine()
    engine.load(spec_for(tiny_gpt2_dir), load_inference_tokenizer(str(tiny_gpt2_dir)))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def urls(engine: ProcessEngine, tiny_gpt2_dir: Path) -> Iterator[tuple[str, str]]:
    """The process server's URL and an in-process server's for the same model."""
    local = create_app(load_for_inference(str(tiny_gpt2_dir), device="cpu"), MODEL_ID, max_new_tokens=8)
    with running_server(engine_app(engine)) as process_url, running_server(local) as local_url:
        yield process_url, local_url


# (endpoint, options): greedy, sampled with a seed, streamed, several choices and prompts, log-probs, a stop
REQUESTS = [
    ("chat", {"messages": [{"role": "user", "content": "the king"}], "temperature": 0}),
    ("chat", {"messages": [{"role": "user", "content": "my lady"}], "max_tokens": 6, "stream": True}),
    ("chat", {"messages": [{"role": "user", "content": "hear"}], "n": 2, "temperature": 1.0, "seed": 7}),
    ("chat", {"messages": [{"role": "user", "content": "what"}], "logprobs": True, "top_logprobs": 2}),
    ("text", {"prompt": ["thou shalt", "good day"], "max_tokens": 5, "temperature": 0}),
    ("text", {"prompt": "sweet love", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("text", {"prompt": "heaven and", "max_tokens": 12, "stop": ["e"], "stream": True}),
]


def answer(url: str, kind: str, options: dict) -> list:
    """The request's choices as plain data (a stream's chunks joined per choice), without ids and timestamps."""
    client = openai_client(url)
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    result = create(model=MODEL_ID, **options)
    if not options.get("stream"):
        return [choice.model_dump() for choice in result.choices]
    joined: dict[int, list] = {}
    for chunk in result:
        for choice in chunk.choices:
            text = choice.delta.content if kind == "chat" else choice.text
            joined.setdefault(choice.index, []).append((text or "", choice.finish_reason))
    return [
        ("".join(text for text, _ in parts), [reason for _, reason in parts if reason]) for parts in joined.values()
    ]


def same(got: object, expected: object) -> bool:
    """Equal, floats within 1e-4: a log-prob's last bits depend on the rows beside it in a batch."""
    if isinstance(expected, float) and isinstance(got, float):
        return math.isclose(got, expected, abs_tol=1e-4)
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(same(got[key], expected[key]) for key in expected)
    if isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        return len(got) == len(expected) and all(same(a, b) for a, b in zip(got, expected, strict=True))
    return got == expected


def test_answers_equal_the_in_process_server(urls: tuple[str, str]) -> None:
    process_url, local_url = urls
    expected = [answer(local_url, kind, options) for kind, options in REQUESTS]
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # all at once: the rows share the model process's batches
        got = list(pool.map(lambda request: answer(process_url, *request), REQUESTS))
    assert same(got, expected), (got, expected)


def test_refusals_cross_the_pipe(urls: tuple[str, str]) -> None:
    client = openai_client(urls[0])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens") as raised:
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=500)
    assert raised.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.completions.create(model="other", prompt="hi", max_tokens=2)


def test_a_load_error_in_the_model_process_is_raised_by_the_server(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    engine = ProcessEngine()
    try:
        with pytest.raises(ConfigError, match="no such model directory"):
            engine.load(spec_for(tmp_path / "gone"), load_inference_tokenizer(str(tiny_gpt2_dir)))
    finally:
        engine.close()
    assert engine._process.exitcode == 0  # it returned after reporting, no traceback


def test_shutdown_refuses_new_requests_and_the_model_process_exits(tiny_gpt2_dir: Path) -> None:
    engine = ProcessEngine()
    engine.load(spec_for(tiny_gpt2_dir), load_inference_tokenizer(str(tiny_gpt2_dir)))
    with running_server(engine_app(engine)) as url:
        client = openai_client(url)
        assert client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2).choices[0].text is not None
        engine.begin_shutdown(grace_seconds=60)
        with pytest.raises(openai.InternalServerError, match="shutting down") as raised:
            client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2)
        assert raised.value.status_code == 503
    # the app's lifespan closed the engine as the server stopped
    assert not engine._process.is_alive() and engine._process.exitcode == 0


def test_the_model_side_cuts_a_cancelled_row(tiny_gpt2_dir: Path) -> None:
    slow = slowed_model(tiny_gpt2_dir, 0.02)
    server_end, model_end = Pipe()
    side = ModelSide({MODEL_ID: Served(slow)}, spec_for(tiny_gpt2_dir, max_new_tokens=40), model_end)
    thread = threading.Thread(target=side.run, daemon=True)
    thread.start()
    assert server_end.recv() == (READY,)
    request = ChatCompletionRequest(model=MODEL_ID, messages=[ChatMessage(role="user", content="my lord")])
    server_end.send((SUBMIT, 0, MODEL_ID, request))
    assert server_end.recv()[:2] == (ACCEPTED, 0)
    kind, items = server_end.recv()  # the first step's text
    assert kind == ROWS and items[0][0] == (0, 0)
    server_end.send((CANCEL, (0, 0)))
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the cancelled row should have ended"
        kind, items = server_end.recv()
        finishes = [item for _, item in items if isinstance(item, Finish)]
        if finishes:
            break
    assert finishes[0].finish_reason == CUT and finishes[0].completion_tokens < 40
    server_end.send((CLOSE,))
    assert server_end.recv() == (CLOSED,)
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_rows_of_a_request_whose_client_left_before_they_were_accepted_are_cancelled() -> None:
    from hfpipe.tools.serve_process import _resolve

    async def scenario() -> tuple[list[str], str]:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        gone, waiting = loop.create_future(), loop.create_future()
        gone.cancel()  # the request's task was cancelled while the model process prepared it
        _resolve(loop, gone, ["row"], unwanted=lambda: calls.append("cancel rows"))
        _resolve(loop, waiting, ["row"], unwanted=lambda: calls.append("not this one"))
        return calls, (await waiting)[0]

    assert asyncio.run(scenario()) == (["cancel rows"], "row")
