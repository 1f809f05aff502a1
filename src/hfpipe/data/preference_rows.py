"""Preference data for DPO: detect each source's row format, validate rows, convert them to TRL's
prompt/chosen/rejected format, and check pair lengths against max_length.

Conversion rules (documented in the README):
- `prompt` + `chosen` + `rejected`: kept as written, strings (TRL adds EOS to each answer) or message lists
  (rendered with the chat template).
- `instruction` (+ optional `input`) + `chosen` + `rejected`: the same layout SFT uses: with a chat template, one
  user turn and assistant answers; without one, the `### Instruction:` prompt and string answers.
- `chosen` + `rejected` only, as whole conversations sharing their first turns: the shared turns become the
  prompt (TRL's `extract_prompt`).
"""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import extract_prompt

from hfpipe.data.chat_templates import render_ids
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

ANSWERS = ("chosen", "rejected")


def detect_preference_format(columns: list[str], source: str) -> str:
    """Name the preference row format from a source's columns."""
    names = set(columns)
    if not set(ANSWERS) <= names:
        missing = " and ".join(f"'{name}'" for name in ANSWERS if name not in names)
        raise DataError(
            f"{source}: no {missing} column (columns: {', '.join(sorted(names))}). Preference rows need 'chosen' and "
            "'rejected' answers, with 'prompt' or 'instruction' (or whole conversations in chosen/rejected)."
        )
    if "prompt" in names:
        return "prompt"
    if "instruction" in names:
        return "instruction"
    return "implicit_prompt"


def _value_problem(value: Any, field: str) -> str | None:
    if isinstance(value, list):
        return messages_problem(value, field)
    return None if nonempty_text(value) else f"'{field}' is empty"


def preference_row_problem(row: dict[str, Any], row_format: str) -> str | None:
    """Describe what is wrong with one preference row, or None when it can be trained on."""
    prompt_field = {"prompt": "prompt", "instruction": "instruction"}.get(row_format)
    fields = ([prompt_field] if prompt_field else []) + list(ANSWERS)
    for field in fields:
        problem = _value_problem(row.get(field), field)
        if problem:
            return problem
    if row_format == "instruction" and any(isinstance(row[field], list) for field in fields):
        return "instruction rows take plain strings; use 'prompt' for message lists"
    if len({isinstance(row[field], list) for field in fields}) > 1:
        return "mixes plain strings and message lists; use one kind for prompt, chosen and rejected"
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are identical, so the pair teaches nothing"
    for field in ANSWERS:
        if isinstance(row[field], list) and row[field][-1]["role"] != "assistant":
            return f"the last message of '{field}' must be the assistant's"
    return None


def convert_preference_row(
    row: dict[str, Any], row_format: str, chat: bool, system_prompt: str | None
) -> dict[str, Any]:
    """Convert a valid row to TRL's {'prompt', 'chosen', 'rejected'}, all strings or all message lists."""
    if row_format == "implicit_prompt":
        return extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    if row_format == "prompt":
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    extra = row.get("input") or ""
    if chat:
        user = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {
            "prompt": [*system, {"role": "user", "content": user}],
            **{field: [{"role": "assistant", "content": row[field]}] for field in ANSWERS},
        }
    layout = INSTRUCTION_INPUT_PROMPT if extra.strip() else INSTRUCTION_PROMPT
    return {"prompt": layout.format(instruction=row["instruction"], input=extra), **{f: row[f] for f in ANSWERS}}


def prepare_preference_rows(source: Source, chat: bool, data_args: TuningArguments) -> tuple[Dataset, str, int]:
    """Validate and convert one source; return the converted rows, their format and the number skipped."""
    dataset = source.dataset
    row_format = detect_preference_format(dataset.column_names, source.name)
    dataset, skipped = drop_bad_rows(
        dataset, lambda row: preference_row_problem(row, row_format), source.name, data_args.skip_bad_rows
    )
    if len(dataset) == 0:
        raise DataError(f"{source.name}: no usable rows.")
    if not chat and (row_format == "implicit_prompt" or isinstance(dataset[0]["chosen"], list)):
        raise DataError(
            f"{source.name}: message rows need a chat template and the tokenizer has none. "
            "Set chat_template: chatml (or a .jinja file), or use instruction/chosen/rejected rows."
        )
    converted = dataset.map(
        lambda row: convert_preference_row(row, row_format, chat, data_args.system_prompt),
        remove_columns=dataset.column_names,
        desc=f"Converting {os.path.basename(source.name)} ({row_format})",
    )
    return converted, row_format, skipped


def pair_lengths(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """(prompt + chosen, prompt + rejected) token counts per converted row, as TRL tokenizes them (EOS included)."""
    return [
        (
            len(render_ids(tokenizer, {"prompt": row["prompt"], "completion": row["chosen"]})),
            len(render_ids(tokenizer, {"prompt": row["prompt"], "completion": row["rejected"]})),
        )
        for row in dataset
    ]


def check_pair_lengths(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, skip_bad_rows: bool, source: str
) -> tuple[Dataset, int]:
    """A pair longer than max_length would be compared on truncated answers: stop naming the row, or skip such
    rows (counted) with skip_bad_rows. Returns the kept rows and the training tokens (both answers)."""
    lengths = pair_lengths(dataset, tokenizer)
    too_long = [index for index, pair in enumerate(lengths) if max(pair) > max_length]
    if too_long and not skip_bad_rows:
        index = too_long[0]
        more = f" ({len(too_long) - 1} more rows are too long)" if len(too_long) > 1 else ""
        raise DataError(
            f"{source}: row {index + 1}: prompt + answer is {max(lengths[index])} tokens, max_length is "
            f"{max_length}{more}, so the answers would be compared truncated. Raise max_length, shorten the row, or "
            "set skip_bad_rows: true."
        )
    if too_long:
        print(f"warning: {source}: skipped {len(too_long)} pairs longer than max_length={max_length}")
        keep = sorted(set(range(len(dataset))) - set(too_long))
        dataset, lengths = dataset.select(keep), [lengths[index] for index in keep]
    return dataset, sum(chosen + rejected for chosen, rejected in lengths)


def preference_preparer(tokenizer: PreTrainedTokenizerBase, max_length: int):
    """The row preparer for `data.sources.load_splits`: preference rows converted, then checked against max_length
    per source, so that an error names the file and row."""

    def prepare(source: Source, chat: bool, data_args: TuningArguments) -> tuple[Dataset, str, int]:
        converted, row_format, skipped = prepare_preference_rows(source, chat, data_args)
        converted, _ = check_pair_lengths(converted, tokenizer, max_length, data_args.skip_bad_rows, source.name)
        return converted, row_format, skipped

    return prepare


def count_pair_tokens(tokenizer: PreTrainedTokenizerBase, max_length: int):
    """Token counter for the source table: prompt + chosen + prompt + rejected per row."""
    return lambda dataset: check_pair_lengths(dataset, tokenizer, max_length, True, "")[1]
