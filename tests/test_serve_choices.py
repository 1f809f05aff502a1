"""`hfpipe serve` with several choices per request: completions prompt lists (text or token ids) and `n` on both
endpoints, whole or streamed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from test_serve import MODEL_ID, chat, openai_client, running_server

from hfpipe.models.trained import LoadedModel, load_for_inference
from hfpipe.tools.serve import create_app

PROMPTS = ["The king", "my lady", "what night"]


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_for_inference(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(scope="module")
def client(loaded: LoadedModel) -> Iterator[openai.OpenAI]:
    with running_server(create_app(loaded, MODEL_ID, max_new_tokens=8)) as url:
        yield openai_client(url)


def single(client: openai.OpenAI, prompt: str) -> str:
    return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0).choices[0].text


def test_a_prompt_list_gets_one_choice_per_prompt(client: openai.OpenAI, loaded: LoadedModel) -> None:
    expected = [single(client, prompt) for prompt in PROMPTS]
    assert len(set(expected)) > 1, "the prompts should have different answers"
    answer = client.completions.create(model=MODEL_ID, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert [choice.text for choice in answer.choices] == expected
    prompt_ids = [loaded.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    assert answer.usage.prompt_tokens == sum(len(ids) for ids in prompt_ids)
    as_ids = client.completions.create(model=MODEL_ID, prompt=prompt_ids, max_tokens=6, temperature=0)
    assert [choice.text for choice in as_ids.choices] == expected
    one_id_list = client.completions.create(model=MODEL_ID, prompt=prompt_ids[1], max_tokens=6, temperature=0)
    assert [choice.text for choice in one_id_list.choices] == expected[1:2]


def test_n_choices_are_indexed_prompt_by_prompt(client: openai.OpenAI) -> None:
    expected = [single(client, prompt) for prompt in PROMPTS[:2]]
    answer = client.completions.create(model=MODEL_ID, prompt=PROMPTS[:2], n=3, max_tokens=6, temperature=0)
    assert [choice.index for choice in answer.choices] == list(range(6))
    assert [choice.text for choice in answer.choices] == [expected[0]] * 3 + [expected[1]] * 3
    chat_answer = chat(client, "Hello king", n=2, max_tokens=6, temperature=0)
    assert [choice.index for choice in chat_answer.choices] == [0, 1]
    assert chat_answer.choices[0].message.content == chat_answer.choices[1].message.content
    assert (
        chat_answer.usage.completion_tokens
        == 2 * chat(client, "Hello king", max_tokens=6, temperature=0).usage.completion_tokens
    )


def test_seeded_n_sampling_is_reproducible_and_varied(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        options = {"n": 4, "max_tokens": 10, "temperature": 1.0, "seed": 7}
        return [
            choice.text for choice in client.completions.create(model=MODEL_ID, prompt="The queen", **options).choices
        ]

    first = sample()
    assert first == sample()
    assert len(set(first)) > 1, "sampled choices should differ from one another"


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_streamed_choices_join_to_the_whole_answer(client: openai.OpenAI, kind: str) -> None:
    options = {"model": MODEL_ID, "max_tokens": 6, "temperature": 0, "n": 2}
    if kind == "text":
        create, options = client.completions.create, {**options, "prompt": PROMPTS[:2]}
    else:
        create, options = client.chat.completions.create, {**options, "messages": [{"role": "user", "content": "hi"}]}
    whole = create(**options)
    texts: dict[int, str] = defaultdict(str)
    finishes, roles = {}, set()
    chunks = list(create(**options, stream=True, stream_options={"include_usage": True}))
    for item in chunks[:-1]:
        (choice,) = item.choices
        if kind == "text":
            texts[choice.index] += choice.text
        else:
            texts[choice.index] += choice.delta.content or ""
            roles |= {choice.index} if choice.delta.role == "assistant" else set()
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    expected = [choice.text if kind == "text" else choice.message.content for choice in whole.choices]
    assert [texts[index] for index in range(len(expected))] == expected
    assert finishes == {choice.index: choice.finish_reason for choice in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    if kind == "chat":
        assert roles == {0, 1}


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_a_text_chunk_is_the_openai_typed_chunk_with_its_text(kind: str) -> None:
    import json

    from hfpipe.tools.openai_schema import TextChunks, chunk

    texts = TextChunks(kind, "id-1", "model/x", True, 2)
    for text in ['say "hi"\n', "caf\u00e9 \u2603 \\ </s>", "", "\x00hfpipe-text\x00"]:
        body = json.loads(texts.body(text))
        expected = chunk(kind, "id-1", "model/x", text, with_usage=True, index=2)
        assert {**body, "created": 0} == {**expected, "created": 0}
