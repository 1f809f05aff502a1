"""`hfpipe serve` log-probs: the requests lm-evaluation-harness's local-completions model sends for log-likelihood
tasks give the log-likelihoods of `hfpipe eval --choices`; completions and chat report their tokens' log-probs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from test_serve import MODEL_ID, openai_client, reference, running_server

from hfpipe.evaluation.scoring import choice_logprobs, choice_row, encode_pair, joined
from hfpipe.models.trained import LoadedModel, load_for_inference
from hfpipe.tools.serve import create_app

ROOT = Path(__file__).resolve().parents[1]
CHOICE_ROWS = 3


@pytest.fixture(scope="module")
def long_model(long_context_gpt2_dir: Path) -> LoadedModel:
    """The 1024-position GPT-2: room for the multiple-choice rows."""
    return load_for_inference(str(long_context_gpt2_dir), device="cpu")


@pytest.fixture(scope="module")
def long_client(long_model: LoadedModel) -> Iterator[openai.OpenAI]:
    with running_server(create_app(long_model, MODEL_ID, max_new_tokens=8)) as url:
        yield openai_client(url)


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_for_inference(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(scope="module")
def client(tiny: LoadedModel) -> Iterator[openai.OpenAI]:
    with running_server(create_app(tiny, MODEL_ID, max_new_tokens=8)) as url:
        yield openai_client(url)


def lm_eval_payload(prompt: object) -> dict:
    """LocalCompletionsAPI._create_payload(generate=False) of lm-evaluation-harness (lm_eval/models/
    openai_completions.py): what it sends for log-likelihood requests."""
    return {"model": MODEL_ID, "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234}


def lm_eval_parse(choices: list[dict], ctxlens: list[int]) -> list[tuple[float, bool]]:
    """LocalCompletionsAPI.parse_logprobs: the continuation's summed log-prob and whether it is greedy."""
    results = []
    for choice, ctxlen in zip(sorted(choices, key=lambda item: item["index"]), ctxlens, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        greedy = all(logprob == max(top.values()) for logprob, top in zip(token_logprobs, top_logprobs, strict=True))
        results.append((sum(token_logprobs), greedy))
    return results


def post(client: openai.OpenAI, body: dict) -> dict:
    """POST /v1/completions with extra fields the typed client would not send as given (echo with lists)."""
    return client.post("/completions", body=body, cast_to=object)


def test_lm_eval_loglikelihood_requests_give_the_choice_scorers_sums(
    long_client: openai.OpenAI, long_model: LoadedModel
) -> None:
    lines = (ROOT / "data/eval/shakespeare_mc.jsonl").read_text().splitlines()[:CHOICE_ROWS]
    rows = [choice_row(json.loads(line)) for line in lines]
    expected, _ = choice_logprobs(long_model.model, long_model.tokenizer, rows, batch_size=4, max_length=1024)
    tokenizer = long_model.tokenizer
    pairs = [encode_pair(tokenizer, row.context, joined(row.context, ending)) for row in rows for ending in row.endings]
    assert all(joined(row.context, ending) == ending for row in rows for ending in row.endings)  # newline endings
    ctxlens = [len(context) for context, _ in pairs]
    # tokenized_requests=True (the default): token-id lists, a batch of them in one request
    batched = post(long_client, {**lm_eval_payload([c + e for c, e in pairs]), "echo": True})
    # tokenized_requests=False: the text, one request per pair with batch_size 1
    texts = [tokenizer.decode(c + e) for c, e in pairs]
    singles = [post(long_client, {**lm_eval_payload(text), "echo": True})["choices"][0] for text in texts]
    flat = [logprob for row_scores in expected for logprob in row_scores]
    for answer in (lm_eval_parse(batched["choices"], ctxlens), lm_eval_parse(singles, ctxlens)):
        assert [logprob for logprob, _ in answer] == pytest.approx(flat, abs=1e-4)
        assert [greedy for _, greedy in answer] == [is_greedy(long_model, c, e) for c, e in pairs]
    for choice, (context, ending), text in zip(batched["choices"], pairs, texts, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(context) + len(ending) + 1  # the prompt, then the generated token
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert choice["text"].startswith(text) and "".join(logprobs["tokens"]) == choice["text"]
        assert all(
            choice["text"][offset : offset + len(token)] == token
            for offset, token in zip(logprobs["text_offset"], logprobs["tokens"], strict=True)
        )
    assert batched["usage"]["completion_tokens"] == len(pairs)


def is_greedy(loaded: LoadedModel, context: list[int], continuation: list[int]) -> bool:
    """Whether every continuation token is the model's most likely next token (lm-eval's is_greedy)."""
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        predicted = loaded.model(input_ids=ids).logits[0, len(context) - 1 : -1].argmax(-1).tolist()
    return predicted == continuation


def test_completion_logprobs_score_the_generated_tokens(client: openai.OpenAI, tiny: LoadedModel) -> None:
    answer = client.completions.create(model=MODEL_ID, prompt="The king", max_tokens=6, temperature=0, logprobs=2)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == answer.usage.completion_tokens == 6
    prompt_ids = tiny.tokenizer("The king")["input_ids"]
    text, new_ids = reference(tiny, prompt_ids, 6)
    assert choice.text == text
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.inference_mode():
        scores = torch.log_softmax(tiny.model(input_ids=ids).logits[0].float(), -1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(new_ids) - 1)
    expected = [scores[position, ids[0, position + 1]].item() for position in positions]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert all(
        len(top) <= 2 and max(top.values()) == logprob
        for top, logprob in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )  # greedy: the chosen token is the likeliest
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[0] == len("The king")


def test_echo_with_no_new_tokens_scores_the_prompt(client: openai.OpenAI, tiny: LoadedModel) -> None:
    prompt_ids = tiny.tokenizer("my lord the king")["input_ids"]
    answer = post(client, {"model": MODEL_ID, "prompt": prompt_ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    choice = answer["choices"][0]
    assert choice["text"] == "my lord the king"
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids) and answer["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(prompt_ids) - 1)
    assert all(logprob < 0 for logprob in choice["logprobs"]["token_logprobs"][1:])


def test_chat_logprobs_list_each_content_token(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello king"}]
    answer = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    plain = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == answer.choices[0].message.content
