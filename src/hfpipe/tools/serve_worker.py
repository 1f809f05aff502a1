"""The generation side of `hfpipe serve`: a request's prompt rendered as the model was trained, its
GenerationConfig, and one worker thread that runs `model.generate` for one request at a time (the others wait
in arrival order), streaming text through transformers' AsyncTextIteratorStreamer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from transformers import (
    AsyncTextIteratorStreamer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    set_seed,
)

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

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer clients send "developer" where older ones send "system"


@dataclass
class Job:
    """One request, ready to generate."""

    prompt_ids: list[int]
    config: GenerationConfig
    seed: int | None
    stops: list[str]


@dataclass
class Finish:
    """How a generation ended: the last item a stream yields."""

    finish_reason: str  # "stop" (EOS or a stop sequence) or "length" (max tokens)
    prompt_tokens: int
    completion_tokens: int


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


def completion_budget(prompt_tokens: int, requested: int | None, default: int, context: int | None, param: str) -> int:
    """The number of new tokens to generate; a prompt that leaves no room, or an explicit request beyond the
    context, is a 400 with the token counts (OpenAI's context_length_exceeded)."""
    if context is None:
        return requested or default
    if prompt_tokens >= context:
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
    return requested or min(default, context - prompt_tokens)


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
        max_new_tokens=max_new_tokens,
        do_sample=False if greedy else None,
        temperature=None if greedy else request.temperature,
        top_p=None if greedy else request.top_p,
        top_k=0 if sampling and model_top_k is None else None,
    )


def prepare_job(loaded: LoadedModel, request: GenerationRequest, default_max_new_tokens: int) -> Job:
    """Render a chat or completion request's prompt and build its GenerationConfig; RequestError when it does not
    fit the model's context."""
    if isinstance(request, ChatCompletionRequest):
        prompt_ids, param = chat_prompt_ids(loaded.tokenizer, request.messages), "messages"
    else:
        assert isinstance(request, CompletionRequest)
        prompt_ids, param = completion_prompt_ids(loaded.tokenizer, request.prompt_text()), "prompt"
    budget = completion_budget(
        len(prompt_ids), request.requested_tokens(), default_max_new_tokens, context_length(loaded.model), param
    )
    config = generation_config_for(loaded, request, budget)
    return Job(prompt_ids, config, request.seed, request.stop_strings())


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


class RequestStop(StoppingCriteria):
    """Stop a generation once its text contains a stop sequence, or its cancel event is set (the client went away,
    or the server is shutting down). Unlike GenerationConfig.stop_strings, a stop sequence must lie in the generated
    text: transformers' StopStringCriteria also matches one that begins in the prompt."""

    def __init__(
        self, event: threading.Event, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stops: list[str]
    ) -> None:
        self.event, self.tokenizer, self.prompt_length, self.stops = event, tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        done = self.event.is_set()
        if self.stops and not done:
            text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
            done = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class ModelWorker:
    """Runs `model.generate` on one thread, one request at a time; requests wait in arrival order."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfpipe-generate")
        self._running: set[threading.Event] = set()
        self._stopping = False

    async def stream(self, job: Job) -> AsyncIterator[str | Finish]:
        """Yield the generated text in pieces (stop sequences cut out), then a Finish."""
        streamer = AsyncTextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        self._running.add(cancel)
        stops = StopFilter(job.stops)
        try:
            future = self._executor.submit(self._generate, job, streamer, cancel)
            async for piece in streamer:
                if text := stops.feed(piece):
                    yield text
            if text := stops.flush():
                yield text
            output = await asyncio.wrap_future(future)
        finally:
            cut = cancel.is_set()  # only a shutdown sets it before this point
            cancel.set()  # reached early when the client disconnects: the generation stops at its next token
            self._running.discard(cancel)
        if output is None or cut:
            raise RequestError("The server is shutting down; retry later.", status=503, error_type="server_error")
        yield self._finish(job, output[0, len(job.prompt_ids) :].tolist(), stops.stopped)

    def _generate(
        self, job: Job, streamer: AsyncTextIteratorStreamer, cancel: threading.Event
    ) -> torch.LongTensor | None:
        if cancel.is_set() or self._stopping:
            streamer.end()
            return None
        try:
            if job.seed is not None:
                set_seed(job.seed)  # safe: this thread is the only one generating
            input_ids = torch.tensor([job.prompt_ids], device=self.loaded.model.device)
            return self.loaded.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=job.config,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList(
                    [RequestStop(cancel, self.loaded.tokenizer, len(job.prompt_ids), job.stops)]
                ),
            )
        except Exception:
            streamer.end()  # otherwise the request would wait for text forever
            raise

    def _finish(self, job: Job, new_ids: list[int], stopped_by_string: bool) -> Finish:
        eos = job.config.eos_token_id if job.config.eos_token_id is not None else self.loaded.tokenizer.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        at_limit = len(new_ids) >= job.config.max_new_tokens and not (new_ids and new_ids[-1] in eos_ids)
        reason = "length" if at_limit and not stopped_by_string else "stop"
        return Finish(reason, len(job.prompt_ids), len(new_ids))

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Answer queued requests with 503 now; let the running generation finish within `grace_seconds`, then
        stop it at its next token (503, or an error event in a stream)."""
        self._stopping = True
        timer = threading.Timer(grace_seconds, self._cancel_running)
        timer.daemon = True
        timer.start()

    def _cancel_running(self) -> None:
        for cancel in list(self._running):
            cancel.set()

    def close(self) -> None:
        """Stop the running generation at its next token, drop queued ones, and end the worker thread."""
        self._stopping = True
        self._cancel_running()
        self._executor.shutdown(wait=True, cancel_futures=True)
