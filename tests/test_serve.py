"""`hfpipe serve`: the real openai client against a real uvicorn server (in a thread, or as a subprocess for SIGTERM)
serving the session's tiny GPT-2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from hfpipe.models.trained import LoadedModel, load_for_inference
from hfpipe.tools.serve import create_app, default_model_id
from hfpipe.tools.serve_worker import StopFilter

if TYPE_CHECKING:
    from fastapi import FastAPI

MODEL_ID = "tiny"
INSTRUCTION = "### Instruction:\n{}\n\n### Response:\n"


@contextmanager
def running_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free port; yield the API's base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server thread died at start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir: Path) -> LoadedModel:
    """The tiny GPT-2 (no chat template: the instruction layout) loaded for inference on CPU."""
    return load_for_inference(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(scope="module")
def base_url(loaded: LoadedModel) -> Iterator[str]:
    """A server for the tiny GPT-2, shared by the module's tests."""
    with running_server(create_app(loaded, MODEL_ID, max_new_tokens=8)) as url:
        yield url


def openai_client(base_url: str) -> openai.OpenAI:
    """The openai client for a server at `base_url`, no retries (a retried 4xx would hide the first answer)."""
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    """The openai client of the module's server."""
    return openai_client(base_url)


def reference(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy text and new ids straight from model.generate, as the server should answer."""
    import torch

    input_ids = torch.tensor([prompt_ids])
    output = loaded.model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    new_ids = output[0, len(prompt_ids) :].tolist()
    return loaded.tokenizer.decode(new_ids, skip_special_tokens=True), new_ids


def expected_finish(loaded: LoadedModel, new_ids: list[int], max_new_tokens: int) -> str:
    """The finish reason the server should give for the reference's ids: stop at EOS, length at the limit."""
    ended = new_ids[-1] == loaded.tokenizer.eos_token_id
    return "length" if len(new_ids) == max_new_tokens and not ended else "stop"


def chat(client: openai.OpenAI, content: str, **kwargs: object) -> object:
    """One chat completion with a single user message to the tiny model."""
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_endpoint_lists_the_served_id(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "hfpipe"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_chat_answer_is_greedy_generate_on_the_instruction_layout(client: openai.OpenAI, loaded: LoadedModel) -> None:
    answer = chat(client, "Hello king", max_tokens=8, temperature=0)
    prompt_ids = loaded.tokenizer(INSTRUCTION.format("Hello king"))["input_ids"]
    text, new_ids = reference(loaded, prompt_ids, 8)
    assert answer.object == "chat.completion" and answer.model == MODEL_ID
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == expected_finish(loaded, new_ids, 8)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), len(new_ids))
    assert answer.usage.total_tokens == len(prompt_ids) + len(new_ids)
    default_length = chat(client, "Hello king", temperature=0)  # the server's max_new_tokens=8 applies
    assert default_length.choices[0].message.content == text


def test_chat_stream_concatenates_to_the_non_streamed_answer(client: openai.OpenAI) -> None:
    full = chat(client, "Hello king", max_tokens=8, temperature=0)
    chunks = list(
        chat(client, "Hello king", max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert all(item.object == "chat.completion.chunk" and item.id == chunks[0].id for item in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [
        item.choices[0].delta.content for item in chunks if item.choices and item.choices[0].delta.content
    ]
    assert len(content_chunks) > 1, "the answer should arrive in several chunks"
    assert "".join(content_chunks) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(item.usage is None for item in chunks[:-1])
    plain = list(chat(client, "Hello king", max_tokens=8, temperature=0, stream=True))
    assert plain[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(item.usage is None for item in plain)


def test_completions_endpoint_continues_a_raw_prompt(client: openai.OpenAI, loaded: LoadedModel) -> None:
    prompt_ids = loaded.tokenizer("The king")["input_ids"]
    text, new_ids = reference(loaded, prompt_ids, 6)
    answer = client.completions.create(model=MODEL_ID, prompt="The king", max_tokens=6, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == text
    assert answer.choices[0].finish_reason == expected_finish(loaded, new_ids, 6)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    as_list = client.completions.create(model=MODEL_ID, prompt=["The king"], max_tokens=6, temperature=0)
    assert as_list.choices[0].text == text
    stream = client.completions.create(model=MODEL_ID, prompt="The king", max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(item.choices[0].text for item in chunks) == text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> str:
        options = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 3}
        return client.completions.create(model=MODEL_ID, prompt="The queen", **options).choices[0].text

    assert sample() == sample()


def test_stop_sequences_cut_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_ID, prompt="my lord", max_tokens=12, temperature=0).choices[0].text
    stop = full[2:4]  # the fixture's answer repeats a 3-character token: this stop spans two tokens
    expected = full[: full.find(stop)]
    assert expected, "the stop sequence should cut after some text"
    for stops in (stop, ["never-generated", stop]):
        answer = client.completions.create(model=MODEL_ID, prompt="my lord", max_tokens=12, temperature=0, stop=stops)
        assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
        assert answer.usage.completion_tokens < 12, "generation should stop at the stop sequence"
        stream = client.completions.create(
            model=MODEL_ID, prompt="my lord", max_tokens=12, temperature=0, stop=stops, stream=True
        )
        chunks = list(stream)
        assert "".join(item.choices[0].text for item in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_filter_holds_back_a_possible_stop_sequence() -> None:
    stops = StopFilter(["lo w", "zz"])
    assert [stops.feed(piece) for piece in ["Hel", "lo", " ", "wo", "rld"]] == ["He", "l", "", "", ""]
    assert stops.stopped and stops.flush() == ""
    open_end = StopFilter(["zz"])
    assert [open_end.feed(piece) for piece in ["az", "b z"]] == ["a", "zb "]
    assert open_end.flush() == "z"


LONG = "the king " * 40


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"temperature": 2.5}, openai.BadRequestError, r"temperature: 2.5 is outside \[0, 2\]"),
        ({"temperature": -1}, openai.BadRequestError, r"temperature: -1.0 is outside \[0, 2\]"),
        ({"top_p": 0}, openai.BadRequestError, r"top_p: 0.0 is outside \(0, 1\]"),
        ({"top_p": 1.5}, openai.BadRequestError, r"top_p: 1.5 is outside \(0, 1\]"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens: 0 must be at least 1"),
        ({"max_completion_tokens": -3}, openai.BadRequestError, "max_completion_tokens: -3 must be at least 1"),
        ({"n": 0}, openai.BadRequestError, "n: 0 must be at least 1"),
        ({"n": 200}, openai.BadRequestError, "1 prompt\\(s\\) x n=200 is more than 128 choices"),
        ({"top_logprobs": 3}, openai.BadRequestError, "top_logprobs: requires logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, openai.BadRequestError, r"top_logprobs: 21 is outside \[0, 20\]"),
        ({"logprobs": True, "stream": True}, openai.BadRequestError, "logprobs: not supported with stream: true"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty: not supported by this server"),
        ({"messages": []}, openai.BadRequestError, "messages: List should have at least 1 item"),
        ({"messages": "hello"}, openai.BadRequestError, "messages: Input should be a valid list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, openai.BadRequestError, r"messages\[0\].role: Input should"),
        ({"temperature": "hot"}, openai.BadRequestError, "temperature: Input should be a valid number"),
        ({"stop": [1]}, openai.BadRequestError, "stop: must be a string or a list of strings"),
        ({"max_tokens": 1000}, openai.BadRequestError, r"requested \d+ tokens \(\d+ in the prompt, 1000 for the"),
        (
            {"messages": [{"role": "user", "content": LONG}]},
            openai.BadRequestError,
            r"maximum context length is 64 tokens, and the prompt has \d+ tokens",
        ),
        ({"model": "gpt-4o"}, openai.NotFoundError, "The model 'gpt-4o' does not exist: this server serves 'tiny'"),
    ],
)
def test_bad_requests_are_openai_errors(client: openai.OpenAI, options: dict, error: type, message: str) -> None:
    request = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **options}
    with pytest.raises(error, match=message) as raised:
        client.chat.completions.create(**request)
    assert raised.value.type == "invalid_request_error"
    assert set(raised.value.body) == {"message", "type", "param", "code"}


def post_raw(url: str, body: bytes) -> tuple[int, dict]:
    """POST bytes as JSON; return the status and the decoded JSON answer."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/chat/completions", b'{"model": "tiny", "messages": [', 400, "The request body is not valid JSON"),
        ("/chat/completions", b'{"model": "tiny"}', 400, "messages: Field required"),
        ("/chat/completions", b"[1, 2]", 400, "request body: Input should be a valid dictionary"),
        ("/completions", b'{"model": "tiny", "prompt": [1, "a"]}', 400, "prompt: must be a string, a list of"),
        ("/completions", b'{"model": "tiny", "prompt": []}', 400, "prompt: must not be an empty list"),
        ("/completions", b'{"model": "tiny", "prompt": [5000]}', 400, "prompt: token id 5000 is outside"),
        ("/completions", b'{"model": "tiny", "prompt": "a", "logprobs": true}', 400, "logprobs: must be an integer"),
    ],
)
def test_malformed_bodies_get_openai_error_json(
    base_url: str, path: str, body: bytes, status: int, message: str
) -> None:
    code, answer = post_raw(base_url + path, body)
    assert code == status
    assert answer["error"]["message"].startswith(message)
    assert answer["error"]["type"] == "invalid_request_error"


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "options",
    [
        {"tools": [TOOL]},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            ]
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]},
    ],
)
def test_tool_calling_is_refused_in_one_clear_error(client: openai.OpenAI, options: dict) -> None:
    request = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **options}
    with pytest.raises(openai.BadRequestError, match="Tool calling is not supported by hfpipe serve") as raised:
        client.chat.completions.create(**request)
    assert raised.value.param in ("tools", "messages[1]")


def test_other_endpoints_are_openai_404s_naming_the_supported_ones(client: openai.OpenAI, base_url: str) -> None:
    supported = "Supported: POST /v1/chat/completions, POST /v1/completions, GET /v1/models"
    with pytest.raises(openai.NotFoundError, match=r"Embeddings \(/v1/embeddings\) are not supported") as raised:
        client.embeddings.create(model=MODEL_ID, input="hi")
    assert supported in raised.value.message and raised.value.code == "unsupported_endpoint"
    with pytest.raises(openai.NotFoundError, match=r"The Responses API \(/v1/responses\) is not supported"):
        client.responses.create(model=MODEL_ID, input="hi")
    for path in ("/audio/speech", "/"):
        code, answer = post_raw(base_url + path, b"{}")
        assert code == 404 and answer["error"]["message"].startswith(f"POST /v1{path} is not an endpoint")
        assert supported in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"
    with pytest.raises(urllib.error.HTTPError) as wrong_method:
        urllib.request.urlopen(base_url + "/chat/completions", timeout=60)
    assert wrong_method.value.code == 405
    assert json.load(wrong_method.value)["error"]["message"].startswith("GET /v1/chat/completions: method not allowed")


def test_concurrent_requests_each_get_their_own_answer(client: openai.OpenAI) -> None:
    prompts = ["the king", "my lady", "what night", "sweet love", "thou shalt", "good day"]

    def ask(index: int) -> str:
        # a seeded row draws from its own generator: its answer does not depend on the rows decoded beside it
        options = {"temperature": 0} if index % 3 else {"temperature": 1.0, "seed": index}
        if index % 2:
            stream = chat(client, prompts[index], max_tokens=8, stream=True, **options)
            return "".join(item.choices[0].delta.content or "" for item in stream if item.choices)
        return chat(client, prompts[index], max_tokens=8, **options).choices[0].message.content

    sequential = [ask(index) for index in range(len(prompts))]
    assert len(set(sequential)) > 1, "the prompts should have different answers"
    with ThreadPoolExecutor(len(prompts)) as pool:
        for _ in range(2):
            assert list(pool.map(ask, range(len(prompts)))) == sequential


def test_chat_template_model_renders_with_its_template(loaded: LoadedModel, tmp_path: Path) -> None:
    from hfpipe.data.chat_templates import apply_chat_template_choice, fit_model_to_tokenizer

    tokenizer = loaded.tokenizer.__class__.from_pretrained(loaded.path)
    apply_chat_template_choice("chatml", tokenizer)
    model = load_for_inference(loaded.path, device="cpu").model
    fit_model_to_tokenizer(model, tokenizer)
    templated = LoadedModel(model, tokenizer, str(tmp_path), None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello king"}]
    prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    text, _ = reference(templated, prompt_ids, 6)
    with running_server(create_app(templated, "chatml-tiny")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="chatml-tiny", messages=messages, max_tokens=6, temperature=0)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.choices[0].message.content == text


def test_conversation_without_template_uses_the_instruction_layout(client: openai.OpenAI, loaded: LoadedModel) -> None:
    from hfpipe.tools.prompts import encode_prompt, render_chat_prompt

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hail"},
        {"role": "user", "content": "Who?"},
    ]
    rendered = render_chat_prompt(loaded.tokenizer, messages)
    assert rendered.startswith("Be brief.") and rendered.endswith(INSTRUCTION.format("Who?"))
    prompt_tokens = len(encode_prompt(loaded.tokenizer, rendered, "instruction"))
    assert prompt_tokens > 64  # the tiny model's context: the error message reports the count
    with pytest.raises(openai.BadRequestError, match=f"the prompt has {prompt_tokens} tokens"):
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2, temperature=0)


def test_requests_after_shutdown_began_get_503(loaded: LoadedModel) -> None:
    app = create_app(loaded, MODEL_ID)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert chat(client, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")
        app.state.engine.begin_shutdown(grace_seconds=60)
        with pytest.raises(openai.InternalServerError, match="shutting down") as raised:
            chat(client, "hi", max_tokens=2)
        assert raised.value.status_code == 503
        with pytest.raises(openai.InternalServerError, match="shutting down") as raised:  # before the stream starts
            chat(client, "hi", max_tokens=2, stream=True)
        assert raised.value.status_code == 503


def slowed_model(model_dir: Path, seconds: float) -> LoadedModel:
    """The model loaded on CPU, each forward pass `seconds` longer: a generation lasts long enough to act on."""
    slow = load_for_inference(str(model_dir), device="cpu")
    forward = slow.model.forward

    def slow_forward(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return forward(*args, **kwargs)

    slow.model.forward = slow_forward
    return slow


def test_shutdown_cuts_a_running_generation(tiny_gpt2_dir: Path) -> None:
    slow = slowed_model(tiny_gpt2_dir, 0.05)  # 20 tokens take a second: stopped in the middle
    app = create_app(slow, MODEL_ID)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        chunks = iter(chat(client, "Hello king", max_tokens=20, temperature=0, stream=True))
        next(item for item in chunks if item.choices and item.choices[0].delta.content)
        app.state.engine.begin_shutdown(grace_seconds=0)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(chunks)


def test_default_model_id_is_the_dir_name(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    assert default_model_id(str(tmp_path / "sft") + "/") == "sft"
    assert default_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "0"], "error: --port 0: must be between 1 and 65535."),
        (["--max-new-tokens", "0"], "error: --max-new-tokens 0: must be greater than 0."),
        (["--model-id", " "], "error: --model-id: must not be empty."),
        (["--max-batch-size", "0"], "error: --max-batch-size 0: must be at least 1."),
    ],
)
def test_bad_flags_are_one_line(tiny_gpt2_dir: Path, capsys, flags: list[str], message: str) -> None:
    from hfpipe.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["serve", str(tiny_gpt2_dir), *flags])
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip() == message


def test_missing_model_and_busy_port_stop_before_loading(tmp_path: Path, tiny_gpt2_dir: Path, capsys) -> None:
    from hfpipe.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["serve", str(tmp_path / "nope"), "--port", str(free_port())])
    assert raised.value.code == 2
    assert "no such model directory" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["serve", str(tiny_gpt2_dir), "--port", str(port)])
    err = capsys.readouterr().err
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_sigterm_stops_the_server_cleanly(tiny_gpt2_dir: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "hfpipe.cli", "serve", str(tiny_gpt2_dir), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--model-id", "sub", "--max-new-tokens", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        client = openai_client(url)
        deadline = time.monotonic() + 180  # start-up imports torch and transformers on a shared machine
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        stream = client.chat.completions.create(model="sub", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert list(stream)[-1].choices[0].finish_reason in ("stop", "length")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "Shutting down" in stderr
    assert f"Serving 'sub' at http://127.0.0.1:{port}/v1" in stdout.splitlines()[0]
