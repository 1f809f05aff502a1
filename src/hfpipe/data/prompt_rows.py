"""Prompt rows for online methods (GRPO): detect each source's format, validate rows, convert the prompt to TRL's
format and keep every other column for the rewards (an `answer` column an exact-match reward compares with).

Conversion rules (documented in the README):
- `prompt`: kept as written, a string (used as it is) or a message list (rendered with the chat template).
- `instruction` (+ optional `input`): the layout SFT uses: with a chat template one user turn, without one the
  `### Instruction:` prompt.
- `messages` (or `conversations`): the turns before a trailing assistant answer are the prompt.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from datasets import Dataset

from hfpipe.data.sft_rows import (
    INSTRUCTION_INPUT_PROMPT,
    INSTRUCTION_PROMPT,
    drop_bad_rows,
    messages_problem,
    nonempty_text,
)
from hfpipe.data.sources import Source
from hfpipe.errors import DataError
from hfpipe.sections import TuningArguments

PROMPT_FORMATS = ("prompt", "instruction", "messages")
# Columns a prompt format consumes: converted into `prompt`, not passed on to the rewards.
CONSUMED = {"prompt": ("prompt",), "instruction": ("instruction", "input"), "messages": ("messages", "conversations")}


def detect_prompt_format(columns: list[str], source: str) -> str:
    """Name the prompt format from a source's columns."""
    names = set(columns)
    if "prompt" in names:
        return "prompt"
    if "instruction" in names:
        return "instruction"
    if names & {"messages", "conversations"}:
        return "messages"
    raise DataError(
        f"{source}: no 'prompt', 'instruction' or 'messages' column (columns: {', '.join(sorted(names))}). Prompt "
        "rows need one of them; other columns (e.g. 'answer') are passed to the rewards."
    )


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    messages = row.get("messages", row.get("conversations"))
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def prompt_row_problem(row: dict[str, Any], row_format: str) -> str | None:
    """Describe what is wrong with one prompt row, or None when it can be trained on."""
    if row_format == "messages":
        messages = row.get("messages", row.get("conversations"))
        problem = messages_problem(messages, "messages")
        if problem is None and not _prompt_messages(row):
            return "'messages' holds only an assistant answer; the prompt needs a user turn"
        return problem
    value = row.get(row_format)
    if isinstance(value, list) and row_format == "prompt":
        return messages_problem(value, "prompt")
    return None if nonempty_text(value) else f"'{row_format}' is empty"


def convert_prompt_row(row: dict[str, Any], row_format: str, chat: bool, system_prompt: str | None) -> dict[str, Any]:
    """The row's prompt in TRL's format (a string, or a message list for the chat template)."""
    if row_format == "prompt":
        return {"prompt": row["prompt"]}
    if row_format == "messages":
        return {"prompt": _prompt_messages(row)}
    extra = row.get("input") or ""
    if chat:
        user = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"prompt": [*system, {"role": "user", "content": user}]}
    layout = INSTRUCTION_INPUT_PROMPT if extra.strip() else INSTRUCTION_PROMPT
    return {"prompt": layout.format(instruction=row["instruction"], input=extra)}


def check_reward_columns(dataset: Dataset, row_format: str, required: dict[str, str], source: str) -> None:
    """Every column a reward entry reads (`required`: column -> entry description) must be in the source."""
    available = set(dataset.column_names) - set(CONSUMED[row_format])
    for column, entry in required.items():
        if column not in available:
            raise DataError(
                f"{source}: {entry} reads column '{column}', which this file does not have (columns: "
                f"{', '.join(sorted(available)) or 'none besides the prompt'}). Add the column or change the entry."
            )


def prompt_preparer(required_columns: dict[str, str]):
    """The row preparer for `data.sources.load_splits`: prompt rows validated and converted, with the columns the
    rewards read (`required_columns`: column -> the reward entry that reads it) checked in every source."""

    def prepare(source: Source, chat: bool, data_args: TuningArguments) -> tuple[Dataset, str, int]:
        dataset = source.dataset
        row_format = detect_prompt_format(dataset.column_names, source.name)
        check_reward_columns(dataset, row_format, required_columns, source.name)
        problem_of = _problem_with_columns(row_format, required_columns)
        dataset, skipped = drop_bad_rows(dataset, problem_of, source.name, data_args.skip_bad_rows)
        if len(dataset) == 0:
            raise DataError(f"{source.name}: no usable rows.")
        if not chat and row_format == "messages":
            raise DataError(
                f"{source.name}: message rows need a chat template and the tokenizer has none. Set chat_template: "
                "chatml (or a .jinja file), or use prompt or instruction rows."
            )
        consumed = [column for column in CONSUMED[row_format] if column in dataset.column_names]
        converted = dataset.map(
            lambda row: convert_prompt_row(row, row_format, chat, data_args.system_prompt),
            remove_columns=consumed,
            desc=f"Converting {os.path.basename(source.name)} ({row_format})",
        )
        return converted, row_format, skipped

    return prepare


def _problem_with_columns(row_format: str, required_columns: Iterable[str]):
    def problem_of(row: dict[str, Any]) -> str | None:
        problem = prompt_row_problem(row, row_format)
        if problem:
            return problem
        for column in required_columns:
            if row.get(column) is None or (isinstance(row[column], str) and not row[column].strip()):
                return f"'{column}' is empty (a reward reads it)"
        return None

    return problem_of


def count_prompt_tokens(tokenizer):
    """Token counter for the source table: the rendered prompt of each row."""
    from hfpipe.data.chat_templates import render_prompt_ids

    return lambda dataset: sum(len(render_prompt_ids(tokenizer, {"prompt": row["prompt"]})) for row in dataset)
