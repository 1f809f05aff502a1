"""Supervised fine-tuning data: detect each source's row format, validate rows, convert them to TRL's
formats, mix sources by fraction, and report rows, tokens and truncation.

Conversion rules (documented in the README):
- `text`: kept; the loss covers every token.
- `instruction` + `output` (or `response`), optional `input`: with a chat template, one user turn (instruction,
  a blank line, input) and one assistant turn; without one, the prompt
  `### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n` and the output as completion (TRL adds EOS).
- `messages` (role/content) or `conversations` (from/value): kept as a conversation; needs a chat template.
- `prompt` + `completion`: kept (strings, or message lists).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import PreTrainedTokenizerBase

from hfpipe.data.chat_templates import render_ids, render_prompt_ids
from hfpipe.data.files import BUILDERS, load_files, load_hub, resolve_files
from hfpipe.errors import DataError

FORMATS = ("text", "instruction", "messages", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")
FROM_VALUE_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Source:
    """One loaded data source before conversion."""

    name: str
    dataset: Dataset
    fraction: float | None = None


def detect_format(columns: list[str], source: str) -> str:
    """Name the row format from a source's columns."""
    names = set(columns)
    if names & {"messages", "conversations"}:
        return "messages"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if "instruction" in names and names & {"output", "response"}:
        return "instruction"
    if "text" in names:
        return "text"
    raise DataError(
        f"{source}: cannot tell the row format from its columns ({', '.join(sorted(names))}). Expected 'text'; "
        "'instruction' + 'output' (+ 'input'); 'messages'; or 'prompt' + 'completion'. Rename the columns."
    )


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


def row_problem(row: dict[str, Any], row_format: str) -> str | None:
    """Describe what is wrong with one row, or None when it can be trained on."""
    if row_format == "text":
        return None if nonempty_text(row.get("text")) else "'text' is empty"
    if row_format == "instruction":
        output = row.get("output", row.get("response"))
        if not nonempty_text(row.get("instruction")):
            return "'instruction' is empty"
        return None if nonempty_text(output) else "'output' is empty"
    if row_format == "messages":
        problem = messages_problem(row["messages"], "messages")
        if problem is None and row["messages"][-1]["role"] != "assistant":
            return "the last message must be the assistant's (it is what the model learns to write)"
        return problem
    for field in ("prompt", "completion"):
        value = row.get(field)
        problem = messages_problem(value, field) if isinstance(value, list) else None
        if problem or (not isinstance(value, list) and not nonempty_text(value)):
            return problem or f"'{field}' is empty"
    return None


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
    if row_format == "text":
        return {"text": row["text"]}
    if row_format == "messages":
        return {"messages": row["messages"]}
    if row_format == "prompt_completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
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


def load_source(path: str, where: str, **hub_options: Any) -> Dataset:
    """Load a local file, glob or Hub dataset name as a Dataset with all its columns."""
    is_local = os.path.exists(path) or glob.has_magic(path) or os.path.splitext(path)[1].lower() in BUILDERS
    if is_local:
        return load_files(resolve_files([path], "data", where))
    if hub_options.get("data_files") or hub_options.get("data_dir"):
        try:
            return load_dataset(path, **hub_options)
        except Exception as error:  # one line, whatever the cause
            raise DataError(f"dataset '{path}' could not be loaded: {str(error).splitlines()[0]}") from None
    return load_hub(path, hub_options.get("name"), hub_options.get("split", "train"))


def mix(converted: list[Dataset], fractions: list[float | None]) -> list[Dataset]:
    """Cut each source to its share of the mixture (TRL's rule: normalized fractions, nothing oversampled)."""
    if all(fraction is None for fraction in fractions):
        return converted
    if any(fraction is None for fraction in fractions):
        raise DataError("datasets: set 'fraction' on every dataset of the mixture or on none.")
    total_weight = sum(fractions)
    weights = [fraction / total_weight for fraction in fractions]
    size = min(len(dataset) / weight for dataset, weight in zip(converted, weights, strict=True) if weight > 0)
    return [
        dataset.select(range(min(len(dataset), round(weight * size))))
        for dataset, weight in zip(converted, weights, strict=True)
    ]


def rendered_lengths(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """(prompt tokens, total tokens) per converted row, as the chat template or plain text renders it."""
    return [(len(render_prompt_ids(tokenizer, row)), len(render_ids(tokenizer, row))) for row in dataset]


def concatenate(parts: list[Dataset]) -> Dataset:
    """Concatenate converted sources (all of one TRL format)."""
    kinds = {tuple(sorted(part.column_names)) for part in parts}
    if len(kinds) > 1:
        raise DataError(
            "the datasets convert to different kinds of rows "
            f"({' vs '.join('/'.join(kind) for kind in sorted(kinds))}); mix sources of one kind."
        )
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]
