"""`hfpipe serve BASE --lora NAME=DIR`: several LoRA adapters of one base served at once, chosen by the request's
model, each answering as its adapter merged into the base would, in shared batches."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from test_serve import MODEL_ID, openai_client, reference, running_server

from hfpipe.models.trained import LoadedModel, load_for_inference, load_inference_tokenizer, merge_adapter
from hfpipe.tools.serve import create_app, engine_app
from hfpipe.tools.serve_adapters import load_adapters
from hfpipe.tools.serve_process import EngineSpec, ProcessEngine

PROMPTS = ["the king", "my lady and the night", "what"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny GPT-2 with random (non-zero) weights, saved as SFT saves a LoRA run."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        base = load_for_inference(str(tiny_gpt2_dir), device="cpu")
        config = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
        directory = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(base.model, config).save_pretrained(directory)
        base.tokenizer.save_pretrained(directory)
        dirs[name] = directory
    return dirs


@pytest.fixture(scope="module", params=["in-process", "model process"])
def client(
    request: pytest.FixtureRequest, tiny_gpt2_dir: Path, adapter_dirs: dict[str, Path]
) -> Iterator[openai.OpenAI]:
    """The base and both adapters served from this process (create_app), or as `hfpipe serve --lora` serves them:
    loaded in a model process of their own."""
    adapters = {name: str(path) for name, path in adapter_dirs.items()}
    if request.param == "in-process":
        loaded = load_for_inference(str(tiny_gpt2_dir), device="cpu")
        app = create_app(loaded, MODEL_ID, max_new_tokens=8, served=load_adapters(loaded, MODEL_ID, adapters))
    else:
        engine = ProcessEngine()
        engine.load(
            EngineSpec(str(tiny_gpt2_dir), MODEL_ID, adapters, None, "cpu", False, 8, 16),
            load_inference_tokenizer(str(tiny_gpt2_dir)),
        )
        app = engine_app(engine)
    with running_server(app) as url:
        yield openai_client(url)


@pytest.fixture(scope="module")
def merged(tiny_gpt2_dir: Path, adapter_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    """Each served id as a model of its own: the base, and each adapter merged into a fresh copy of it."""
    base = load_for_inference(str(tiny_gpt2_dir), device="cpu")
    models = {MODEL_ID: base}
    for name, directory in adapter_dirs.items():
        model = merge_adapter(str(directory), str(tiny_gpt2_dir), base.tokenizer, None, False).eval()
        models[name] = LoadedModel(model, base.tokenizer, str(directory), str(tiny_gpt2_dir))
    return models


def complete(client: openai.OpenAI, model: str, prompt: str, stream: bool = False) -> str:
    options = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    if stream:
        return "".join(chunk.choices[0].text for chunk in client.completions.create(**options, stream=True))
    return client.completions.create(**options).choices[0].text


def test_each_id_answers_as_its_merged_model(client: openai.OpenAI, merged: dict[str, LoadedModel]) -> None:
    assert [model.id for model in client.models.list()] == [MODEL_ID, "a", "b"]
    assert client.models.retrieve("b").id == "b"
    answers = {}
    for name, loaded in merged.items():
        answers[name] = [complete(client, name, prompt) for prompt in PROMPTS]
        expected = [reference(loaded, loaded.tokenizer(prompt)["input_ids"], 8)[0] for prompt in PROMPTS]
        assert answers[name] == expected, name
    assert answers["a"] != answers["b"] != answers[MODEL_ID], "the adapters should change the answers"
    scored = client.completions.create(model="a", prompt="the king", max_tokens=3, temperature=0, logprobs=1)
    ids = merged["a"].tokenizer("the king" + scored.choices[0].text)["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(merged["a"].model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = [logprobs[position - 1, ids[position]].item() for position in range(len(ids) - 3, len(ids))]
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny', 'a', 'b'"):
        complete(client, "c", "the king")


def test_requests_for_different_adapters_share_batches(client: openai.OpenAI) -> None:
    requests = [
        (name, prompt, index % 2 == 0)
        for index, (name, prompt) in enumerate((name, prompt) for name in (MODEL_ID, "a", "b") for prompt in PROMPTS)
    ]
    expected = [complete(client, name, prompt, stream) for name, prompt, stream in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        assert list(pool.map(lambda request: complete(client, *request), requests)) == expected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_lora_flags_are_checked_before_loading(
    tiny_gpt2_dir: Path, long_context_gpt2_dir: Path, adapter_dirs: dict[str, Path], capsys, tmp_path: Path
) -> None:
    from hfpipe.cli import main

    port = ["--port", str(free_port())]
    cases = [
        ([str(tiny_gpt2_dir), "--lora", "a"], "--lora a: expected NAME=DIR"),
        ([str(tiny_gpt2_dir), "--lora", f"a={tmp_path}"], f"--lora a={tmp_path}: {tmp_path} holds no LoRA adapter"),
        (
            [str(tiny_gpt2_dir), "--lora", f"a={adapter_dirs['a']}", "--lora", f"a={adapter_dirs['b']}"],
            "the id 'a' is served twice",
        ),
        (
            [str(long_context_gpt2_dir), "--lora", f"a={adapter_dirs['a']}"],
            f"--lora a={adapter_dirs['a']}: the adapter was trained on '{tiny_gpt2_dir}'",
        ),
        ([str(adapter_dirs["a"]), "--lora", f"b={adapter_dirs['b']}"], "with --lora, MODEL is the adapters' base"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as raised:
            main(["serve", *flags, *port])
        assert raised.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert json.loads((adapter_dirs["a"] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_gpt2_dir
    )
