"""Continuous batching for `hfpipe serve`: the rows being answered (one per choice of a request) decode together,
one token per step for all of them, over one KV cache; a row leaves the batch the step it ends (EOS, a stop
sequence, its token budget, a cancellation) and a queued row joins at the next step, after its prompt's prefill.

Why not `model.generate`: a batched generate runs until its longest answer ends and takes no newcomers, and
transformers' own continuous batching (`generate_batch`, paged attention) ran 60x slower than generate on CPU here
(15-30 s for 16 short answers). Each row's next token is still chosen as generate chooses it: the logits processors
generate builds from the row's GenerationConfig (temperature, top-k, top-p, repetition penalty, ...), then argmax or
a multinomial draw. A seeded row draws from its own torch.Generator, so that its answer does not depend on the rows
beside it.

The cache is left-padded: every row's tokens end at the last column, shorter histories start with masked padding;
joining pads the shorter side on the left, leaving drops the row and the padding columns no row needs any more.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TextStreamer,
)
from transformers.cache_utils import Cache, DynamicLayer

from hfpipe.models.trained import LoadedModel
from hfpipe.tools.serve_logprobs import TokenScore, score_tokens, scores_at

CUT = "cut"  # the finish reason of a row stopped by a shutdown (or a disconnect): the request gets a 503


@dataclass
class Job:
    """One choice of a request, ready to generate: a row of the batch."""

    prompt_ids: list[int]
    config: GenerationConfig
    max_new_tokens: int  # 0: score the prompt only (echo with max_tokens 0)
    seed: int | None = None  # a seeded sampling row draws from its own generator seeded with this
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # log-probs wanted, with this many alternatives per token
    echo: bool = False  # score the prompt's tokens too
    adapter: str | None = None  # the LoRA adapter the row decodes with (serve_adapters; None: no PEFT model)


@dataclass
class Finish:
    """How a row ended: the last item its stream yields."""

    finish_reason: str  # "stop" (EOS or a stop sequence), "length" (max tokens) or CUT
    prompt_tokens: int
    completion_tokens: int
    scores: list[TokenScore] | None = None  # the scored tokens, when log-probs were asked for
    at_eos: bool = False  # the last new token is an end-of-text (or end-of-turn) token


class RowText(TextStreamer):
    """A row's text, released as transformers' streamers release it (whole words), to `push`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, push: Callable[[Any], None]) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.push = push

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Send a finished piece of text."""
        if text:
            self.push(text)


class Row:
    """A job in the worker: its output channel (`push`, called from the worker thread), its cancel flag and
    what it generated."""

    def __init__(self, job: Job, push: Callable[[Any], None], cancel: threading.Event | None = None) -> None:
        self.job, self.push = job, push
        self.cancel = cancel or threading.Event()
        self.new_ids: list[int] = []
        self.reason: str | None = None  # set when the row has ended
        self.at_eos = False
        self.sent = False  # its Finish (or error) has been pushed

    def finish(self, scores: list[TokenScore] | None = None) -> None:
        """Push the row's Finish once."""
        if not self.sent:
            self.sent = True
            reason, prompt_tokens = self.reason or "length", len(self.job.prompt_ids)
            self.push(Finish(reason, prompt_tokens, len(self.new_ids), scores, self.at_eos))

    def fail(self, error: BaseException) -> None:
        """Push an error instead of a Finish, once."""
        if not self.sent:
            self.sent = True
            self.push(error)


class Decoding:
    """A row being decoded: how it picks tokens, its ids so far, and the token to feed at the next step."""

    def __init__(self, loaded: LoadedModel, row: Row) -> None:
        # a shallow copy: _prepare_special_tokens only sets attributes (token tensors) on it
        model, config = loaded.model, copy.copy(row.job.config)
        self.row, self.do_sample = row, bool(config.do_sample)
        self.ids = torch.tensor([row.job.prompt_ids], device=model.device)
        # the processors generate would apply for this config (private helpers, pinned transformers)
        model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=model.device)
        self.processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=self.ids.shape[1],
            encoder_input_ids=self.ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device=model.device,
            model_kwargs={},
        )
        self.generator = None
        if self.do_sample and row.job.seed is not None:
            self.generator = torch.Generator(device=model.device).manual_seed(row.job.seed)
        eos = config.eos_token_id if config.eos_token_id is not None else loaded.tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}
        self.text = RowText(loaded.tokenizer, row.push)
        self.length = self.ids.shape[1]  # tokens so far: the prompt, then each new one
        self.next_token = -1
        # log-probs read off the decoding pass itself: no second forward pass for them
        self.scores: list[TokenScore] | None = [] if row.job.top_logprobs is not None else None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no logits processor: the batch's argmax is this row's token."""
        return not self.do_sample and len(self.processors) == 0

    def add(self, token: int) -> None:
        """Record the new token (the processors read the ids so far)."""
        self.length += 1
        if len(self.processors):
            self.ids = torch.cat([self.ids, self.ids.new_tensor([[token]])], dim=1)

    def score(self, token: int, logits: torch.Tensor) -> None:
        """Record the log-prob of `token` (and the top alternatives) under the model's raw next-token logits."""
        if self.scores is not None:
            self.scores.extend(scores_at(logits[None], [token], self.row.job.top_logprobs or 0))

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's last logits, as generate picks it."""
        scores = self.processors(self.ids, logits[None].float())
        if self.do_sample:
            return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).item())
        return int(scores.argmax(dim=-1).item())


class ContinuousBatch:
    """The rows decoding together (at most `max_size`) and their left-padded KV cache."""

    def __init__(self, loaded: LoadedModel, max_size: int) -> None:
        self.loaded, self.max_size = loaded, max_size
        self.rows: list[Decoding] = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 where a row has a token
        # the prefill needs the last position's logits only (a model's own code may not take the argument)
        inner = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        takes_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
        self._last_only = {"logits_to_keep": 1} if takes_keep else {}
        self.joinable: bool | None = None  # False for caches that are not plain tensors (sliding windows, ...)

    def room(self) -> int:
        """How many rows may join now."""
        if not self.joinable and self.rows:
            return 0
        if self.joinable is None:  # known after the first prefill
            return 1
        return self.max_size - len(self.rows)

    def join(self, rows: list[Row]) -> None:
        """Prefill the rows' prompts in one left-padded forward pass, choose their first tokens and add them to the
        batch (those that end at once are answered)."""
        joining = []
        for row in rows:
            if row.job.max_new_tokens == 0:  # echo only: nothing to generate
                row.reason = "length"
                self._end(row)
            else:
                joining.append(Decoding(self.loaded, row))
        if not joining:
            return
        model = self.loaded.model
        width = max(decoding.length for decoding in joining)
        ids = torch.zeros((len(joining), width), dtype=torch.long, device=model.device)
        mask = torch.zeros_like(ids)
        for index, decoding in enumerate(joining):
            ids[index, width - decoding.length :] = decoding.ids[0]
            mask[index, width - decoding.length :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        echo = any(decoding.scores is not None and decoding.row.job.echo for decoding in joining)
        with torch.inference_mode():
            output = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **({} if echo else self._last_only),
                **_adapters(joining),
            )
        cache = output.past_key_values
        if self.joinable is None:
            self.joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        for index, decoding in enumerate(joining):
            if decoding.scores is not None and decoding.row.job.echo:
                prompt = decoding.row.job.prompt_ids
                rows = output.logits[index, width - len(prompt) : width - 1]  # row i predicts prompt token i + 1
                first = TokenScore(prompt[0], None, [])
                decoding.scores = [first, *scores_at(rows, prompt[1:], decoding.row.job.top_logprobs or 0)]
        logits = output.logits[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        running = [
            index
            for index, decoding in enumerate(joining)
            if self._advance(
                decoding, greedy[index] if decoding.plain_greedy else decoding.choose(logits[index]), logits[index]
            )
        ]
        if not running:
            return
        keep = torch.tensor(running, device=model.device)
        mask = mask.index_select(0, keep)
        new_layers = [(layer.keys.index_select(0, keep), layer.values.index_select(0, keep)) for layer in cache.layers]
        self.rows.extend(joining[index] for index in running)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            for layer, (keys, values) in zip(cache.layers, new_layers, strict=True):
                layer.keys, layer.values = keys, values
            self._trim()
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for layer, (keys, values) in zip(self.cache.layers, new_layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, length), _pad_left(keys, length)])
            layer.values = torch.cat([_pad_left(layer.values, length), _pad_left(values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask, length)])

    def step(self) -> None:
        """Feed every row its last token, choose the next ones, and drop the rows that ended."""
        model = self.loaded.model
        inputs = torch.tensor([[row.next_token] for row in self.rows], device=model.device)
        positions = torch.tensor([[row.length - 1] for row in self.rows], device=model.device)
        self.mask = torch.cat([self.mask, torch.ones_like(inputs)], dim=1)
        with torch.inference_mode():
            output = model(
                input_ids=inputs,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                **_adapters(self.rows),
            )
        self.cache = output.past_key_values
        logits = output.logits[:, -1]
        greedy = logits.argmax(dim=-1).tolist()  # one call for the rows that need nothing else
        running = [
            self._advance(row, greedy[index] if row.plain_greedy else row.choose(logits[index]), logits[index])
            for index, row in enumerate(self.rows)
        ]
        if not all(running):
            self._keep([index for index, keep in enumerate(running) if keep])

    def _advance(self, decoding: Decoding, token: int, logits: torch.Tensor) -> bool:
        """Give a row its new token (chosen from `logits`); end it if it is done. Whether it keeps decoding."""
        row = decoding.row
        if row.cancel.is_set():
            row.reason = CUT
        else:
            row.new_ids.append(token)
            decoding.add(token)
            decoding.score(token, logits)
            decoding.text.put(torch.tensor([token]))
            row.at_eos = token in decoding.eos_ids
            if row.at_eos or (row.job.stops and self._has_stop(row)):
                row.reason = "stop"
            elif len(row.new_ids) >= row.job.max_new_tokens:
                row.reason = "length"
        if row.reason is None:
            decoding.next_token = token
            return True
        decoding.text.end()
        self._end(row, decoding.scores)
        return False

    def _has_stop(self, row: Row) -> bool:
        # unlike GenerationConfig.stop_strings, a stop sequence must lie in the generated text: transformers'
        # StopStringCriteria also matches one that begins in the prompt
        text = self.loaded.tokenizer.decode(row.new_ids, skip_special_tokens=True)
        return any(stop in text for stop in row.job.stops)

    def _end(self, row: Row, scores: list[TokenScore] | None = None) -> None:
        if row.job.top_logprobs is not None and row.reason != CUT:
            if scores is None:  # echo with nothing to generate: the prompt is scored on its own
                top, adapter = row.job.top_logprobs, row.job.adapter
                scores = score_tokens(self.loaded.model, row.job.prompt_ids, 0, top, adapter)
            row.finish(scores)
        row.finish()

    def _keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[index] for index in indices]
        if not self.rows:
            self.cache = self.mask = None
            return
        keep = torch.tensor(indices, device=self.mask.device)
        self.mask = self.mask.index_select(0, keep)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, keep), layer.values.index_select(0, keep)
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns that are padding in every row."""
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def fail(self, error: BaseException) -> None:
        """Answer every row with `error` and empty the batch (after a failed forward pass)."""
        for decoding in self.rows:
            decoding.row.fail(error)
        self.rows, self.cache, self.mask = [], None, None

    def cancel_all(self) -> None:
        """Stop every row at its next token."""
        for decoding in self.rows:
            decoding.row.cancel.set()


def _adapters(rows: list[Decoding]) -> dict[str, list[str]]:
    """PEFT's per-row adapter names for a forward pass, when the rows decode with adapters."""
    names = [decoding.row.job.adapter for decoding in rows]
    return {"adapter_names": names} if names[0] is not None else {}


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 2 (keys, values) or dim 1 (a mask) on the left to `length`."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
