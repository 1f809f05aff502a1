"""Rows and log-likelihood scoring for `hfpipe eval`: perplexity over text, multiple-choice and preference accuracy.

Every task reduces to one kernel, `sequence_logprobs`: the summed log-probability of the tokens of a sequence from
some position on, given the tokens before them, in batches. Conventions follow EleutherAI's lm-evaluation-harness
(`lm_eval/api/task.py`, `lm_eval/models/huggingface.py`) and the transformers perplexity guide
(https://huggingface.co/docs/transformers/perplexity), so numbers are comparable with theirs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch, transformers and datasets load inside the functions: `hfpipe eval --help` stays fast
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# lm-eval's default target_delimiter: a multiple-choice ending is scored as " " + ending after the context.
# We leave it out where the row already has whitespace at the joint (an ending that starts a new line).
TARGET_DELIMITER = " "
CHOICE_EXAMPLE = '{"context": "...", "endings": ["...", "..."], "label": 0}'
PREFERENCE_EXAMPLE = '{"instruction" (or "prompt"): "...", "chosen": "...", "rejected": "..."}'


@dataclass
class ChoiceRow:
    """One multiple-choice question: a context, its candidate endings and the index of the right one."""

    context: str
    endings: list[str]
    label: int
    origin: str = ""  # file and line, for messages


@dataclass
class PreferenceRow:
    """A preference row as written, in any format recipes/dpo.py reads, and that format."""

    fields: dict[str, Any]
    row_format: str
    origin: str = ""  # file and line, for messages


def choice_row(row: dict[str, Any]) -> ChoiceRow | str:
    """A multiple-choice row in our field names or HellaSwag's (ctx, label as a string), or what is wrong."""
    context = row.get("context", row.get("ctx"))
    endings, label = row.get("endings"), row.get("label")
    if not _is_text(context):
        return f"'context' (or 'ctx') is missing or empty; rows look like {CHOICE_EXAMPLE}"
    if not isinstance(endings, list) or len(endings) < 2:
        return f"'endings' must be a list of at least 2 strings; rows look like {CHOICE_EXAMPLE}"
    if not all(_is_text(ending) for ending in endings):
        return "every ending must be a non-empty string"
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        return f"'label' must be the index of the right ending (0 to {len(endings) - 1}), got {label!r}"
    if not 0 <= label < len(endings):
        return f"'label' {label} is out of range for {len(endings)} endings (0 to {len(endings) - 1})"
    return ChoiceRow(context, endings, label)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def preference_row(row: dict[str, Any]) -> PreferenceRow | str:
    """A preference row DPO could train on (prompt or instruction, chosen, rejected), or what is wrong with it."""
    from hfpipe.data.preference_rows import detect_preference_format, preference_row_problem

    missing = [name for name in ("chosen", "rejected") if name not in row]
    if missing:
        return f"'{missing[0]}' is missing; rows look like {PREFERENCE_EXAMPLE}"
    row_format = detect_preference_format(list(row), "row")
    return preference_row_problem(row, row_format) or PreferenceRow(row, row_format)


def sequence_logprobs(
    model: PreTrainedModel, sequences: Sequence[list[int]], starts: Sequence[int], batch_size: int
) -> list[tuple[float, int]]:
    """For each sequence, the sum of log-probs of its tokens from `starts[i]` (>= 1) on, each given the tokens
    before it, and how many tokens that is. Sequences are batched longest first, padded on the right."""
    import torch

    order = sorted(range(len(sequences)), key=lambda index: -len(sequences[index]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    device = model.device
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        ids = torch.zeros((len(batch), len(sequences[batch[0]])), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(batch):
            ids[row, : len(sequences[index])] = torch.tensor(sequences[index])
            mask[row, : len(sequences[index])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, index in enumerate(batch):
                sequence, start = sequences[index], starts[index]
                targets = torch.tensor(sequence[start:], device=device)
                logprobs = torch.log_softmax(logits[row, start - 1 : len(sequence) - 1].float(), dim=-1)
                results[index] = (logprobs.gather(1, targets[:, None]).sum().item(), len(targets))
    return results


def text_windows(ids: list[int], max_length: int, stride: int) -> tuple[list[list[int]], list[int]]:
    """Cut a token stream into windows of at most `max_length` tokens, `stride` apart, as in the transformers
    perplexity guide: each window scores only the tokens the previous one did not, with the rest as context.
    `stride == max_length` gives non-overlapping windows (the first token of each has no context and is unscored).
    Returns the windows and the position where each one's scored tokens start."""
    windows, starts = [], []
    previous_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        start = max(1, len(window) - (end - previous_end))
        if start < len(window):
            windows.append(window)
            starts.append(start)
        previous_end = end
        if end == len(ids):
            break
    return windows, starts


def text_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    stride: int,
) -> tuple[dict[str, float], int]:
    """Token-weighted mean negative log-likelihood and perplexity of documents, each ended with EOS and
    concatenated as in pretraining; and the number of tokens scored."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for text in texts for token in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
    windows, starts = text_windows(stream, max_length, stride)
    scores = sequence_logprobs(model, windows, starts, batch_size)
    tokens = sum(count for _, count in scores)
    if tokens == 0:
        return {"loss": math.nan, "perplexity": math.nan}, 0
    loss = -sum(logprob for logprob, _ in scores) / tokens
    return {"loss": loss, "perplexity": math.exp(loss)}, tokens


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, as lm-eval's HFLM._encode_pair makes them: trailing spaces
    of the context move to the continuation, and the continuation's ids are the tail of the whole string's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def fit(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], int]:
    """Join context and continuation, dropping tokens from the left to fit `max_length` (as lm-eval does);
    return the sequence and where the continuation starts in it."""
    sequence = (context + continuation)[-max_length:]
    return sequence, max(1, len(sequence) - len(continuation))


def score_pairs(
    model: PreTrainedModel, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, max_length: int
) -> tuple[list[tuple[float, int]], int]:
    """Log-likelihood (sum, token count) of each continuation given its context; also how many pairs had to be
    cut on the left to fit."""
    fitted = [fit(context, continuation, max_length) for context, continuation in pairs]
    cut = sum(len(context) + len(continuation) > max_length for context, continuation in pairs)
    scores = sequence_logprobs(model, [seq for seq, _ in fitted], [start for _, start in fitted], batch_size)
    return scores, cut


def joined(context: str, ending: str) -> str:
    """The continuation scored after `context`: lm-eval's " " + ending, or the ending alone when the context ends or
    the ending starts with whitespace (so that "line one" + "\nline two" stays two lines)."""
    return ending if context[-1:].isspace() or ending[:1].isspace() else TARGET_DELIMITER + ending


def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[ChoiceRow],
    batch_size: int,
    max_length: int,
) -> tuple[list[list[float]], int]:
    """Per row, the summed log-prob of each ending (joined to the context as `joined` says) given the context; and
    how many (context, ending) pairs were cut to fit `max_length`."""
    pairs = [encode_pair(tokenizer, row.context, joined(row.context, ending)) for row in rows for ending in row.endings]
    scores, cut = score_pairs(model, pairs, batch_size, max_length)
    flat = iter(logprob for logprob, _ in scores)
    return [[next(flat) for _ in row.endings] for row in rows], cut


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda index: (values[index], -index))


def choice_metrics(rows: Sequence[ChoiceRow], logprobs: Sequence[list[float]]) -> dict[str, float]:
    """acc: the ending with the highest summed log-prob is the labelled one. acc_norm: the same after dividing each
    sum by the ending's length in characters, lm-eval's `completion_len = len(choice)` in
    ConfigurableTask.process_results (characters of the ending without the delimiter, not tokens or bytes)."""
    right = right_norm = 0
    for row, scores in zip(rows, logprobs, strict=True):
        right += first_argmax(scores) == row.label
        right_norm += first_argmax([s / len(e) for s, e in zip(scores, row.endings, strict=True)]) == row.label
    return {"acc": right / len(rows), "acc_norm": right_norm / len(rows)}


def render_preference(tokenizer: PreTrainedTokenizerBase, row: PreferenceRow) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the chosen and of the rejected answer, rendered exactly as recipes/dpo.py
    trains on them (its conversion rules, the chat template when the tokenizer has one, EOS after string answers)."""
    from hfpipe.data.chat_templates import render_ids, render_prompt_ids
    from hfpipe.data.preference_rows import convert_preference_row

    converted = convert_preference_row(row.fields, row.row_format, bool(tokenizer.chat_template), None)
    pairs = []
    for answer in ("chosen", "rejected"):
        pair = {"prompt": converted["prompt"], "completion": converted[answer]}
        prompt_ids = render_prompt_ids(tokenizer, pair)
        pairs.append((prompt_ids, render_ids(tokenizer, pair)[len(prompt_ids) :]))
    return pairs


def preference_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[PreferenceRow],
    batch_size: int,
    max_length: int,
) -> tuple[list[tuple[tuple[float, int], tuple[float, int]]], int]:
    """Per row, (log-prob sum, tokens) of the chosen and of the rejected response given the prompt; and how many
    responses were cut to fit `max_length`."""
    pairs = [pair for row in rows for pair in render_preference(tokenizer, row)]
    scores, cut = score_pairs(model, pairs, batch_size, max_length)
    return list(zip(scores[0::2], scores[1::2], strict=True)), cut


def preference_metrics(scores: Sequence[tuple[tuple[float, int], tuple[float, int]]]) -> dict[str, float]:
    """accuracy: share of rows whose chosen response has the higher summed log-prob (strictly, as TRL's reward
    accuracy); accuracy_per_token: the same on the mean log-prob per token; margin: mean summed log-prob
    difference, chosen minus rejected."""
    rows = len(scores)
    by_sum = sum(chosen[0] > rejected[0] for chosen, rejected in scores)
    by_mean = sum(chosen[0] / max(chosen[1], 1) > rejected[0] / max(rejected[1], 1) for chosen, rejected in scores)
    margin = sum(chosen[0] - rejected[0] for chosen, rejected in scores) / rows
    return {"accuracy": by_sum / rows, "accuracy_per_token": by_mean / rows, "margin": margin}
