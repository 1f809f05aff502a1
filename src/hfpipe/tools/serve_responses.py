"""The answers of `hfpipe serve` from its rows: each request's rows collected (whole, or merged into one stream
of chunks) and turned into OpenAI choices, with echo, log-probs and usage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from openai.types import CompletionChoice, CompletionUsage
from openai.types.chat.chat_completion import Choice as ChatChoice
from transformers import PreTrainedTokenizerBase

from hfpipe.tools.openai_schema import CompletionRequest, GenerationRequest, chat_choice, completion_choice, usage
from hfpipe.tools.serve_batch import Finish
from hfpipe.tools.serve_logprobs import chat_logprobs, completion_logprobs
from hfpipe.tools.serve_worker import RowStream


@dataclass
class Answer:
    """One choice as generated: its text (stop sequences cut out) and how it ended."""

    text: str
    finish: Finish


async def collect(streams: Sequence[RowStream]) -> list[Answer]:
    """Every row's whole text and Finish, in row order; the other rows stop when one fails."""

    async def one(stream: RowStream) -> Answer:
        pieces = []
        async for item in stream:
            if isinstance(item, str):
                pieces.append(item)
            else:
                return Answer("".join(pieces), item)
        raise AssertionError("a row ended without a Finish")

    try:
        return list(await asyncio.gather(*(one(stream) for stream in streams)))
    finally:
        for stream in streams:
            stream.cancel()


async def merge(streams: Sequence[RowStream]) -> AsyncIterator[tuple[int, str | Finish]]:
    """The items of all rows as they come, each with its row's index; the first error is raised."""
    if len(streams) == 1:  # the common case, without the extra queue and task
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            streams[0].cancel()
        return
    queue: asyncio.Queue[tuple[int, str | Finish | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RowStream) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        except Exception as error:
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for stream in streams:
            stream.cancel()
        for task in tasks:
            task.cancel()


def total_usage(finishes: Sequence[Finish], per_prompt: int) -> CompletionUsage:
    """Usage of a request from its choices in order: each prompt counted once (not once per choice), every
    choice's tokens."""
    prompt_tokens = sum(finish.prompt_tokens for finish in finishes[::per_prompt])
    return usage(prompt_tokens, sum(finish.completion_tokens for finish in finishes))


def prompt_texts(request: GenerationRequest, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each prompt of a completion request as text (token-id prompts decoded), for echo and text offsets."""
    assert isinstance(request, CompletionRequest)
    return [
        prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)
        for prompt in request.prompts()
    ]


def choices(
    kind: Literal["chat", "text"],
    request: GenerationRequest,
    tokenizer: PreTrainedTokenizerBase,
    answers: Sequence[Answer],
) -> list[ChatChoice] | list[CompletionChoice]:
    """The response's choices, in order (prompt by prompt, n each), with log-probs and echo when asked for."""
    if kind == "chat":
        chat = []
        for index, answer in enumerate(answers):
            scores = answer.finish.scores
            if scores and answer.finish.at_eos:
                scores = scores[:-1]  # the end-of-turn token is not part of the content
            logprobs = None if scores is None else chat_logprobs(tokenizer, scores)
            chat.append(chat_choice(index, answer.text, answer.finish.finish_reason, logprobs))
        return chat
    texts = prompt_texts(request, tokenizer)
    text_choices = []
    for index, answer in enumerate(answers):
        prompt = texts[index // request.choices_per_prompt()]
        text = prompt + answer.text if request.echoes() else answer.text
        scores = answer.finish.scores
        offset = 0 if request.echoes() else len(prompt)
        logprobs = None if scores is None else completion_logprobs(tokenizer, scores, offset)
        text_choices.append(completion_choice(index, text, answer.finish.finish_reason, logprobs))
    return text_choices
