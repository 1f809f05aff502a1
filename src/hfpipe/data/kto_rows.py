"""KTO data: unpaired rows (an answer marked desirable or not) or preference pairs, checked per source, and the
splits turned into TRL's unpaired prompt/completion/label rows.

Row kinds (documented in the README):
- `prompt` + `completion` + `label`, or `instruction` (+ `input`) + `output` + `label`: converted as SFT converts
  those rows (strings or message lists); `label` is true (desirable) or false (undesirable).
- Preference pairs, in every format DPO reads (`preference_rows`): kept as pairs through the held-out split, so
  that both answers of a pair land on the same side, then unrolled into one desirable and one undesirable row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from hfpipe.data.chat_templates import render_ids
from hfpipe.data.preference_rows import ANSWERS, count_pair_tokens, preference_preparer
from hfpipe.data.sft_rows import convert_row, detect_format, drop_bad_rows, row_problem
from hfpipe.data.sources import RowPreparer, Source
from hfpipe.errors import DataError
from hfpipe.sections import TuningArguments

LABEL = "label"
UNPAIRED_FORMATS = ("prompt_completion", "instruction")  # SFT's row formats that carry one answer to a prompt


def is_unpaired(columns: list[str]) -> bool:
    """Whether a source's or split's columns are unpaired rows (with a label) rather than preference pairs."""
    return LABEL in columns


def _unpaired_format(columns: list[str], source: str) -> str:
    row_format = detect_format([name for name in columns if name != LABEL], source)
    if row_format not in UNPAIRED_FORMATS:
        raise DataError(
            f"{source}: '{row_format}' rows with a 'label' column: KTO's unpaired rows are prompt + completion + "
            "label, or instruction + output (+ input) + label."
        )
    return row_format


def label_problem(value: Any) -> str | None:
    """Describe what is wrong with a row's label, or None for true or false."""
    if value is None:
        return "'label' is missing"
    if not isinstance(value, bool):
        return f"'label' must be true or false, not {json.dumps(value)}"
    return None


def prepare_unpaired_rows(
    source: Source, chat: bool, data_args: TuningArguments, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, str, int]:
    """Validate and convert one source of unpaired rows to TRL's {'prompt', 'completion', 'label'}; return them,
    their format and the number skipped. A row longer than max_length (its answer would be judged truncated) is
    refused or skipped like any other bad row."""
    dataset = source.dataset
    row_format = _unpaired_format(dataset.column_names, source.name)
    dataset, skipped = drop_bad_rows(
        dataset,
        lambda row: row_problem(row, row_format) or label_problem(row.get(LABEL)),
        source.name,
        data_args.skip_bad_rows,
    )
    if len(dataset) == 0:
        raise DataError(f"{source.name}: no usable rows.")
    if not chat and row_format == "prompt_completion" and isinstance(dataset[0]["prompt"], list):
        raise DataError(
            f"{source.name}: message rows need a chat template and the tokenizer has none. "
            "Set chat_template: chatml (or a .jinja file), or use instruction/output/label rows."
        )
    converted = dataset.map(
        lambda row: {**convert_row(row, row_format, chat, data_args.system_prompt), LABEL: row[LABEL]},
        remove_columns=dataset.column_names,
        desc=f"Converting {os.path.basename(source.name)} ({row_format} + label)",
    )

    def too_long(row: dict[str, Any]) -> str | None:
        length = len(render_ids(tokenizer, row))
        if length <= max_length:
            return None
        return f"prompt + completion is {length} tokens, max_length is {max_length}, so it would be judged truncated"

    converted, too_long_rows = drop_bad_rows(converted, too_long, source.name, data_args.skip_bad_rows)
    if len(converted) == 0:
        raise DataError(f"{source.name}: no usable rows.")
    return converted, f"{row_format}+label", skipped + too_long_rows


def kto_preparer(tokenizer: PreTrainedTokenizerBase, max_length: int) -> RowPreparer:
    """The row preparer for `data.sources.load_splits`: unpaired rows converted and checked, or preference pairs
    through DPO's preparer (unrolled later by `kto_splits`, after the held-out split)."""
    pairs = preference_preparer(tokenizer, max_length)

    def prepare(source: Source, chat: bool, data_args: TuningArguments) -> tuple[Dataset, str, int]:
        columns = source.dataset.column_names
        if is_unpaired(columns):
            return prepare_unpaired_rows(source, chat, data_args, tokenizer, max_length)
        if not set(ANSWERS) <= set(columns):
            raise DataError(
                f"{source.name}: no 'label' column and no 'chosen'/'rejected' pair (columns: {', '.join(columns)}). "
                "KTO rows are prompt + completion + label (or instruction + output + label), or preference pairs."
            )
        return pairs(source, chat, data_args)

    return prepare


def count_kto_tokens(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[Dataset], int]:
    """Token counter for the source table: prompt + answer per unpaired row, both answers per pair."""
    pair_tokens = count_pair_tokens(tokenizer, max_length)

    def count(dataset: Dataset) -> int:
        if is_unpaired(dataset.column_names):
            return sum(len(render_ids(tokenizer, row)) for row in dataset)
        return pair_tokens(dataset)

    return count


def unroll_pairs(pairs: Dataset) -> Dataset:
    """One desirable (prompt, chosen) and one undesirable (prompt, rejected) row per converted pair.

    TRL's KTO batches rows in dataset order and estimates its KL term by giving each row the completion of the row
    before it: so neighbouring rows never share a prompt and labels alternate (pair 0's chosen, pair 1's rejected,
    pair 2's chosen, ..., then the other answer of each pair in the same order).
    """
    answers = [
        pairs.map(
            lambda row, field=field: {"completion": row[field], LABEL: field == "chosen"},
            remove_columns=list(ANSWERS),
            desc=f"Unrolling the {field} answers",
        )
        for field in ANSWERS
    ]
    count = len(pairs)
    first = [index if index % 2 == 0 else count + index for index in range(count)]
    second = [count + index if index % 2 == 0 else index for index in range(count)]
    return concatenate_datasets(answers).select(first + second)


def held_out_pairs(validation: Dataset) -> Dataset | None:
    """The held-out preference pairs (converted, before unrolling), None when the held-out rows are unpaired."""
    return None if is_unpaired(validation.column_names) else validation


def kto_rows(rows: Dataset) -> Dataset:
    """A split as TRL's unpaired rows: unpaired rows as they are, pairs unrolled."""
    return rows if is_unpaired(rows.column_names) else unroll_pairs(rows)


def kto_splits(splits: DatasetDict, seed: int) -> DatasetDict:
    """Train and validation as TRL's unpaired rows. The training rows (or pairs) are shuffled once with the seed
    first: TRL's KTO samples them in order, and sources that arrive grouped by label (a file of good answers after
    a file of bad ones) would otherwise train on batches of one label only."""
    return DatasetDict(
        {"train": kto_rows(splits["train"].shuffle(seed=seed)), "validation": kto_rows(splits["validation"])}
    )
