"""`hfpipe serve` continuous batching: requests sent together are decoded in one batch (rows joining and leaving
while others decode), and their greedy answers equal the answers of a server that runs one at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import MODEL_ID, openai_client, reference, running_server, slowed_model

from hfpipe.models.trained import LoadedModel, load_for_inference
from hfpipe.tools.serve import create_app
from hfpipe.tools.serve_batch import CUT

# (prompt, max_tokens, stop, stream): different lengths and budgets, so that rows end at different steps
REQUESTS = [
    ("the king", 12, None, False),
    ("my lady and the queen of the night", 4, None, True),
    ("what", 9, None, False),
    ("sweet love doth never", 12, None, True),
    ("thou shalt not", 2, None, False),
    ("good day my lord, how fares the crown", 12, None, False),
    ("hear", 7, None, True),
    ("heaven and earth", 10, None, False),
]


@pytest.fixture(scope="module")
def servers(tiny_gpt2_dir: Path) -> Iterator[tuple[str, str, list[int], LoadedModel]]:
    """A one-at-a-time server and a batching one whose forward passes are slowed (so that requests overlap) and
    record their batch sizes; yields both URLs, the sizes and the one-at-a-time server's model."""
    single = load_for_inference(str(tiny_gpt2_dir), device="cpu")
    batched = load_for_inference(str(tiny_gpt2_dir), device="cpu")
    sizes: list[int] = []
    forward = batched.model.forward

    def slow_forward(*args: object, **kwargs: object) -> object:
        sizes.append(kwargs["input_ids"].shape[0])
        time.sleep(0.01)
        return forward(*args, **kwargs)

    batched.model.forward = slow_forward
    with (
        running_server(create_app(single, MODEL_ID, max_batch_size=1)) as single_url,
        running_server(create_app(batched, MODEL_ID, max_batch_size=16)) as batched_url,
    ):
        yield single_url, batched_url, sizes, single


def ask(url: str, request: tuple[str, int, str | None, bool]) -> tuple[str, str, int]:
    """One greedy completion: text, finish reason and completion tokens (streamed or not)."""
    client = openai_client(url)
    prompt, max_tokens, stop, stream = request
    options = {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": stop}
    if not stream:
        answer = client.completions.create(**options)
        return answer.choices[0].text, answer.choices[0].finish_reason, answer.usage.completion_tokens
    chunks = list(client.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    finish = next(
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    )
    return text, finish, chunks[-1].usage.completion_tokens


def test_concurrent_greedy_answers_equal_one_at_a_time(servers: tuple[str, str, list[int], LoadedModel]) -> None:
    single_url, batched_url, sizes, loaded = servers
    full = ask(single_url, ("my lord", 12, None, False))[0]
    requests = [*REQUESTS, ("my lord", 12, full[2:4], True)]  # a stop sequence that cuts mid-answer
    expected = [ask(single_url, request) for request in requests]
    for (prompt, max_tokens, _, _), (text, _, _) in zip(REQUESTS, expected, strict=False):
        assert text == reference(loaded, loaded.tokenizer(prompt)["input_ids"], max_tokens)[0]  # model.generate's
    assert len({text for text, _, _ in expected}) > 3, "the prompts should have different answers"
    sizes.clear()
    with ThreadPoolExecutor(len(requests)) as pool:
        assert list(pool.map(lambda request: ask(batched_url, request), requests)) == expected
    assert max(sizes) > 1, "the requests should have shared decoding steps"


def test_rows_join_a_running_batch(servers: tuple[str, str, list[int], LoadedModel]) -> None:
    single_url, batched_url, sizes, _ = servers
    long, short = ("the king", 12, None, True), ("what night", 3, None, False)
    expected = [ask(single_url, long), ask(single_url, short)]
    sizes.clear()
    results: list[object] = []
    first = threading.Thread(target=lambda: results.append(ask(batched_url, long)))
    first.start()
    while len(sizes) < 3:  # the long answer is decoding
        time.sleep(0.005)
    second = ask(batched_url, short)
    first.join()
    assert [results[0], second] == expected
    assert 2 in sizes, "the newcomer should have decoded beside the row that was running when it came"


def test_a_disconnected_stream_leaves_the_batch(tiny_gpt2_dir: Path) -> None:
    slow = slowed_model(tiny_gpt2_dir, 0.02)
    app = create_app(slow, MODEL_ID, max_batch_size=4)
    batch = app.state.engine.worker._batch
    with running_server(app) as url:
        client = openai_client(url)
        messages = [{"role": "user", "content": "my lord"}]
        stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24, stream=True)
        next(iter(stream))  # the role chunk: the answer has started
        deadline = time.monotonic() + 10
        while not batch.rows:
            assert time.monotonic() < deadline, "the row should be decoding"
            time.sleep(0.01)
        row = batch.rows[0].row
        stream.close()
        deadline = time.monotonic() + 10
        while batch.rows:
            assert time.monotonic() < deadline, "the abandoned row should have left the batch"
            time.sleep(0.02)
        assert row.reason == CUT and len(row.new_ids) < 24  # cut when the client went, not finished
        answer = client.completions.create(model=MODEL_ID, prompt="what", max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens == 3 or answer.choices[0].finish_reason == "stop"


def test_a_lone_newcomer_waits_a_few_steps_for_company_beside_a_busy_batch() -> None:
    from hfpipe.tools.serve_worker import JOIN_WAIT_STEPS, joins_now

    assert joins_now(running=7, queued=1, waited=0, max_batch_size=16)  # less than half full: at once
    assert not joins_now(running=8, queued=1, waited=0, max_batch_size=16)  # half full: wait for a second one
    assert joins_now(running=8, queued=2, waited=0, max_batch_size=16)  # two share one prefill
    assert not joins_now(running=15, queued=1, waited=JOIN_WAIT_STEPS - 1, max_batch_size=16)
    assert joins_now(running=15, queued=1, waited=JOIN_WAIT_STEPS, max_batch_size=16)  # not longer
    assert joins_now(running=0, queued=1, waited=0, max_batch_size=1)  # one at a time: no waiting
