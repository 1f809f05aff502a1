"""Rows and reward-model scoring for `hfpipe eval` on a reward model run: the rewards of a file of answers, and how
often a preference pair's chosen answer scores above the rejected one.

Every row is rendered exactly as the reward model was trained (recipes/reward.py: RewardTrainer's prompt + answer):
prompts converted as `data.prompt_rows` converts GRPO's (instruction rows in the chat layout when the reward
tokenizer has a chat template, else the `### Instruction:` layout), preference pairs as `data.preference_rows`
converts them, then scored by `train.rewards.reward_model_scores` and `train.reward.pair_accuracy`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfpipe.errors import DataError

if TYPE_CHECKING:  # torch, transformers and datasets load inside the functions: `hfpipe eval --help` stays fast
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from hfpipe.evaluation.scoring import PreferenceRow

ANSWER_FIELDS = ("completion", "output", "response")
PROMPT_FIELDS = ("prompt", "instruction")  # the prompt formats of data.prompt_rows an answer row may use
ANSWER_EXAMPLE = '{"prompt" (or "instruction" + "input"): "...", "completion" (or "output", "response"): "..."}'


@dataclass
class AnswerRow:
    """A prompt and one answer to it, as written: the row, its prompt format and the field holding the answer."""

    fields: dict[str, Any]
    row_format: str  # "prompt" or "instruction" (data.prompt_rows' names)
    answer_field: str
    origin: str = ""  # file and line, for messages


def answer_row(row: dict[str, Any]) -> AnswerRow | str:
    """An answer row a reward model can score, or what is wrong with it."""
    from hfpipe.data.prompt_rows import prompt_row_problem
    from hfpipe.data.sft_rows import messages_problem

    row_format = next((name for name in PROMPT_FIELDS if name in row), None)
    if row_format is None:
        return f"'prompt' (or 'instruction') is missing; rows look like {ANSWER_EXAMPLE}"
    problem = prompt_row_problem(row, row_format)
    if problem:
        return problem
    if row_format == "instruction" and not isinstance(row.get("input") or "", str):
        return "'input' must be a string"
    given = [name for name in ANSWER_FIELDS if name in row]
    if not given:
        return f"the answer is missing: give 'completion' (or 'output', 'response'); rows look like {ANSWER_EXAMPLE}"
    if len(given) > 1:
        return f"gives both '{given[0]}' and '{given[1]}'; keep one answer per row"
    field, answer = given[0], row[given[0]]
    if isinstance(answer, list):
        if not isinstance(row[row_format], list):
            return f"'{field}' is a message list, which needs a message-list 'prompt'; give the answer as a string"
        problem = messages_problem(answer, field)
        if problem:
            return problem
        if any(message["role"] != "assistant" for message in answer):
            return f"every message of '{field}' must be the assistant's"
    elif not isinstance(answer, str):
        return f"'{field}' must be a string (or assistant messages after a message-list prompt)"
    return AnswerRow(row, row_format, field)


def check_message_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[AnswerRow]) -> None:
    """A prompt written as messages is rendered with the chat template, so the reward tokenizer must have one."""
    for row in rows:
        if not tokenizer.chat_template and isinstance(row.fields[row.row_format], list):
            raise DataError(
                f"{row.origin}: message lists need a chat template and the reward model's tokenizer has none."
            )


def convert_answer_row(row: AnswerRow, chat: bool) -> dict[str, Any]:
    """The row in TRL's prompt/completion format, as the reward model saw its training pairs: the prompt as
    data.prompt_rows converts it, a string answer after a message-list prompt as one assistant turn."""
    from hfpipe.data.prompt_rows import convert_prompt_row

    prompt = convert_prompt_row(row.fields, row.row_format, chat, None)["prompt"]
    answer = row.fields[row.answer_field]
    if isinstance(prompt, list) and isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    return {"prompt": prompt, "completion": answer}


def _check_lengths(lengths: Sequence[int], origins: Sequence[str], max_length: int) -> None:
    for length, origin in zip(lengths, origins, strict=True):
        if length > max_length:
            raise DataError(
                f"{origin}: prompt + answer is {length} tokens and the reward model reads at most {max_length}. "
                "Shorten the row or remove it."
            )


def answer_rewards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[AnswerRow],
    batch_size: int,
    max_length: int,
) -> list[float]:
    """The reward of each row's answer to its prompt."""
    from hfpipe.data.chat_templates import render_ids
    from hfpipe.train.rewards import reward_model_scores

    converted = [convert_answer_row(row, bool(tokenizer.chat_template)) for row in rows]
    _check_lengths([len(render_ids(tokenizer, row)) for row in converted], [row.origin for row in rows], max_length)
    reward = reward_model_scores(model, tokenizer, batch_size)
    return reward(prompts=[row["prompt"] for row in converted], completions=[row["completion"] for row in converted])


def reward_metrics(rewards: Sequence[float]) -> dict[str, float]:
    """mean, std (of the rows themselves: population), min and max of the rewards."""
    return {
        "mean": statistics.fmean(rewards),
        "std": statistics.pstdev(rewards),
        "min": min(rewards),
        "max": max(rewards),
    }


def preference_pair_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[PreferenceRow], max_length: int
) -> dict[str, float]:
    """accuracy: the share of pairs whose chosen answer scores above the rejected one (strictly); margin: the mean
    reward of chosen minus rejected. Pairs converted as the reward stage converts its training rows."""
    from hfpipe.data.preference_rows import convert_preference_row, pair_lengths
    from hfpipe.train.reward import pair_accuracy

    chat = bool(tokenizer.chat_template)
    converted = [convert_preference_row(row.fields, row.row_format, chat, None) for row in rows]
    longest = [max(pair) for pair in pair_lengths(converted, tokenizer)]
    _check_lengths(longest, [row.origin for row in rows], max_length)
    return pair_accuracy(model, tokenizer, converted)
