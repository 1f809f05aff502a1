"""SFT row formats: detect each source's format from its columns, validate rows, convert them to TRL's formats.
A format is one `RowFormat` entry in `ROW_FORMATS`.

Conversion rules (documented in the README):
- `text`: kept; the loss covers every token.
- `instruction` + `output` (or `response`), optional `input`: with a chat template, one user turn (instruction,
  a blank line, input) and one assistant turn; without one, the prompt
  `### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n` and the output as completion (TRL adds EOS).
- `messages` (role/content) or `conversations` (from/value): kept as a conversation; needs a chat template.
- `prompt` + `completion`: kept (strings, or message lists).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from hfpipe.data.sources import Source
from hfpipe.errors import DataError
from hfpipe.sections import TuningArguments

ROLES = ("system", "user", "assistant", "tool")
FROM_VALUE_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class RowFormat:
    """One SFT row format: the columns that identify it, what makes a row unusable, and its TRL conversion."""

    name: str
    matches: Callable[[set[str]], bool]  # from the source's column names
    problem: Callable[[dict[str, Any]], str | None]
    convert: Callable[[dict[str, Any], bool, str | None], dict[str, Any]]  # (row, chat template?, system prompt)


def nonempty_text(value: Any) -> bool:
    """True for a string with something besides whitespace."""
    return isinstance(value, str) and value.strip() != ""


def messages_problem(messages: Any, field: str) -> str | None:
    """Describe what is wrong with a list of {role, content} messages, or None."""
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{role, content}} messages"
    for turn, message in enumerate(messages, start=1):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not nonempty_text(message.get("content"))
        ):
            return f"'{field}' message {turn} needs a role ({', '.join(ROLES)}) and non-empty content"
    return None


def _text_problem(row: dict[str, Any]) -> str | None:
    return None if nonempty_text(row.get("text")) else "'text' is empty"


def _instruction_problem(row: dict[str, Any]) -> str | None:
    if not nonempty_text(row.get("instruction")):
        return "'instruction' is empty"
    return None if nonempty_text(row.get("output", row.get("response"))) else "'output' is empty"


def _messages_problem(row: dict[str, Any]) -> str | None:
    problem = messages_problem(row["messages"], "messages")
    if problem is None and row["messages"][-1]["role"] != "assistant":
        return "the last message must be the assistant's (it is what the model learns to write)"
    return problem


def _prompt_completion_problem(row: dict[str, Any]) -> str | None:
    for field in ("prompt", "completion"):
        value = row.get(field)
        problem = messages_problem(value, field) if isinstance(value, list) else None
        if problem or (not isinstance(value, list) and not nonempty_text(value)):
            return problem or f"'{field}' is empty"
    return None


def _convert_instruction(row: dict[str, Any], chat: bool, system_prompt: str | None) -> dict[str, Any]:
    output = row.get("output", row.get("response"))
    extra = row.get("input") or ""
    if chat:
        user = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": output}]}
    layout = INSTRUCTION_INPUT_PROMPT if extra.strip() else INSTRUCTION_PROMPT
    return {"prompt": layout.format(instruction=row["instruction"], input=extra), "completion": output}


# Detection order: the first format whose columns match names the source's rows.
ROW_FORMATS: dict[str, RowFormat] = {
    row_format.name: row_format
    for row_format in (
        RowFormat(
            "messages",
            lambda names: bool(names & {"messages", "conversations"}),
            _messages_problem,
            lambda row, chat, system: {"messages": row["messages"]},
        ),
        RowFormat(
            "prompt_completion",
            lambda names: {"prompt", "completion"} <= names,
            _prompt_completion_problem,
            lambda row, chat, system: {"prompt": row["prompt"], "completion": row["completion"]},
        ),
        RowFormat(
            "instruction",
            lambda names: "instruction" in names and bool(names & {"output", "response"}),
            _instruction_problem,
            _convert_instruction,
        ),
        RowFormat(
            "text", lambda names: "text" in names, _text_problem, lambda row, chat, system: {"text": row["text"]}
        ),
    )
}
FORMATS = tuple(ROW_FORMATS)


def detect_format(columns: list[str], source: str) -> str:
    """Name the row format from a source's columns."""
    names = set(columns)
    for row_format in ROW_FORMATS.values():
        if row_format.matches(names):
            return row_format.name
    raise DataError(
        f"{source}: cannot tell the row format from its columns ({', '.join(sorted(names))}). Expected 'text'; "
        "'instruction' + 'output' (+ 'input'); 'messages'; or 'prompt' + 'completion'. Rename the columns."
    )


def _format(name: str) -> RowFormat:
    if name not in ROW_FORMATS:
        raise ValueError(f"unknown row format {name!r}; known: {', '.join(ROW_FORMATS)}")
    return ROW_FORMATS[name]


def row_problem(row: dict[str, Any], row_format: str) -> str | None:
    """Describe what is wrong with one row, or None when it can be trained on."""
    return _format(row_format).problem(row)


def _normalise_conversations(row: dict[str, Any]) -> dict[str, Any]:
    turns = row.get("messages")
    if turns is None:
        turns = [
            {"role": FROM_VALUE_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
            for t in row["conversations"]
        ]
    return {"messages": turns}



def convert_row(row: dict[str, Any], row_format: str, chat: bool, system_prompt: str | None) -> dict[str, Any]:
    """Convert a valid row to TRL's format: {'text'}, {'messages'} or {'prompt', 'completion'}."""
    return _format(row_format).convert(row, chat, system_prompt)


def prepare_source(
    source: Source, chat: bool, system_prompt: str | None, skip_bad_rows: bool
) -> tuple[Dataset, str, int]:
    """Validate and convert one source; return the converted rows, their format and the number skipped."""
    dataset = source.dataset
    row_format = detect_format(dataset.column_names, source.name)
    if row_format == "messages":
        dataset = dataset.map(_normalise_conversations, remove_columns=dataset.column_names)
        if not chat:
            raise DataError(
                f"{source.name}: conversation rows need a chat template and the tokenizer has none. "
                "Set chat_template: chatml (or a .jinja file)."
            )
    dataset, skipped = drop_bad_rows(dataset, lambda row: row_problem(row, row_format), source.name, skip_bad_rows)
    converted = dataset.map(
        lambda row: convert_row(row, row_format, chat, system_prompt),
        remove_columns=dataset.column_names,
        desc=f"Converting {os.path.basename(source.name)} ({row_format})",
    )
    if len(converted) == 0:
        raise DataError(f"{source.name}: no usable rows.")
    return converted, row_format, skipped


def drop_bad_rows(
    dataset: Dataset, problem_of: Callable[[dict[str, Any]], str | None], source: str, skip_bad_rows: bool
) -> tuple[Dataset, int]:
    """Stop at the first row `problem_of` finds fault with (naming the source and row, 1-based), or with
    `skip_bad_rows` drop every such row; return the kept rows and how many were dropped."""
    bad = [(index, problem) for index, row in enumerate(dataset) if (problem := problem_of(row))]
    if bad and not skip_bad_rows:
        index, problem = bad[0]
        more = f" ({len(bad) - 1} more rows have problems)" if len(bad) > 1 else ""
        raise DataError(
            f"{source}: row {index + 1}: {problem}{more}. Fix the row, or set skip_bad_rows: true to skip such rows."
        )
    if bad:
        dataset = dataset.select(sorted(set(range(len(dataset))) - {index for index, _ in bad}))
    return dataset, len(bad)
def prepare_sft_rows(source: Source, chat: bool, data_args: TuningArguments) -> tuple[Dataset, str, int]:
    """SFT's row preparer: text, instruction, messages or prompt/completion rows."""
    return prepare_source(source, chat, data_args.system_prompt, data_args.skip_bad_rows)
