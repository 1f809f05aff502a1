"""Row sources of the SFT and DPO recipes (and every stage that reads rows): local files, globs or Hub datasets,
or a TRL mixture (`datasets:` with fractions); each source converted by the stage's row preparer, mixed, split into
train and validation, with a table of rows and tokens per source."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset
from transformers import PreTrainedTokenizerBase, TrainingArguments
from trl import DatasetMixtureConfig

from hfpipe.config import ParsedConfig
from hfpipe.data.chat_templates import render_ids, render_prompt_ids
from hfpipe.data.files import BUILDERS, load_files, load_hub, resolve_files
from hfpipe.errors import DataError
from hfpipe.sections import TuningArguments


@dataclass
class Source:
    """One loaded data source before conversion."""

    name: str
    dataset: Dataset
    fraction: float | None = None


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


def concatenate(parts: list[Dataset]) -> Dataset:
    """Concatenate converted sources (all of one TRL format)."""
    kinds = {tuple(sorted(part.column_names)) for part in parts}
    if len(kinds) > 1:
        raise DataError(
            "the datasets convert to different kinds of rows "
            f"({' vs '.join('/'.join(kind) for kind in sorted(kinds))}); mix sources of one kind."
        )
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def rendered_lengths(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """(prompt tokens, total tokens) per converted row, as the chat template or plain text renders it."""
    return [(len(render_prompt_ids(tokenizer, row)), len(render_ids(tokenizer, row))) for row in dataset]


# Validates and converts one source: returns its rows in TRL's format, the format's name and the rows skipped.
RowPreparer = Callable[[Source, bool, TuningArguments], tuple[Dataset, str, int]]


def load_splits(
    parsed: ParsedConfig,
    tokenizer: PreTrainedTokenizerBase,
    smoke: bool,
    prepare: RowPreparer,
    count_tokens: Callable[[Dataset], int] | None = None,
) -> tuple[DatasetDict, str]:
    """Load the config's sources, convert each with `prepare` (which validates its rows), mix them by fraction;
    split off validation rows when none are given, and keep at most max_eval_samples of them. Returns the splits and
    a printable table of rows and tokens per source (`count_tokens`: the rendered tokens of SFT rows by default)."""
    data_args, mixture = parsed.get(TuningArguments), parsed.get(DatasetMixtureConfig)
    where = str(parsed.path)
    chat = tokenizer.chat_template is not None

    def convert(sources: list[Source]) -> list[tuple[Dataset, str, int]]:
        prepared = [prepare(source, chat, data_args) for source in sources]
        for source, (_, _, skipped) in zip(sources, prepared, strict=True):
            if skipped:
                print(f"warning: {source.name}: skipped {skipped} rows that cannot be trained on (skip_bad_rows: true)")
        return prepared

    sources = _train_sources(data_args, mixture, where)
    prepared = convert(sources)
    parts = mix([dataset for dataset, _, _ in prepared], [source.fraction for source in sources])
    count_tokens = count_tokens or (lambda part: sum(total for _, total in rendered_lengths(part, tokenizer)))
    table = source_table(sources, [row_format for _, row_format, _ in prepared], parts, count_tokens)
    train = concatenate(parts)
    validation_sources = _validation_sources(data_args, where)
    if validation_sources:
        validation = concatenate([dataset for dataset, _, _ in convert(validation_sources)])
    else:
        train, validation = _hold_out(
            train, mixture.test_split_size, parsed.get(TrainingArguments).seed, sources, where
        )
    if data_args.max_eval_samples is not None and len(validation) > data_args.max_eval_samples:
        validation = validation.select(range(data_args.max_eval_samples))
    splits = DatasetDict({"train": train, "validation": validation})
    if smoke:
        splits = DatasetDict({name: split.select(range(min(len(split), 32))) for name, split in splits.items()})
    return splits, table


def _hold_out(train: Dataset, size: float, seed: int, sources: list[Source], where: str) -> tuple[Dataset, Dataset]:
    """Split test_split_size of the training rows off for validation; too few rows is one DataError line."""
    try:
        split = train.train_test_split(test_size=size, seed=seed)
    except ValueError:  # the held-out share (rounded up) would leave no training row
        fixes = (
            "Add rows, give validation_files, or lower test_split_size"
            if len(train) > 1
            else "Add rows or give validation_files"
        )
        raise DataError(
            f"{where}: {len(train)} training row(s) from {', '.join(source.name for source in sources)} are too few to "
            f"hold out test_split_size: {size} of them for validation (no training row would be left). {fixes}."
        ) from None
    return split["train"], split["test"]


def _train_sources(data_args: TuningArguments, mixture: DatasetMixtureConfig, where: str) -> list[Source]:
    if data_args.train_files:
        return [Source(path, load_source(path, where)) for path in data_args.train_files]
    if data_args.dataset_name:
        return [_hub_source(data_args, data_args.dataset_train_split, where)]
    return [
        Source(
            config.path,
            load_source(
                config.path,
                where,
                name=config.name,
                data_dir=config.data_dir,
                data_files=config.data_files,
                split=config.split,
            ),
            config.fraction,
        )
        for config in mixture.datasets
    ]


def _validation_sources(data_args: TuningArguments, where: str) -> list[Source]:
    if data_args.validation_files:
        return [Source(path, load_source(path, where)) for path in data_args.validation_files]
    if data_args.dataset_name and data_args.dataset_test_split:
        return [_hub_source(data_args, data_args.dataset_test_split, where)]
    return []


def _hub_source(data_args: TuningArguments, split: str, where: str) -> Source:
    name = data_args.dataset_name
    return Source(name, load_source(name, where, name=data_args.dataset_config, split=split))


def source_table(
    sources: list[Source], formats: list[str], parts: list[Dataset], count_tokens: Callable[[Dataset], int]
) -> str:
    """Rows, tokens and share per source of the training mixture."""
    token_counts = [count_tokens(part) for part in parts]
    all_rows = sum(len(part) for part in parts) or 1
    lines = [f"{'source':<48} {'format':<18} {'rows':>7} {'share':>6} {'tokens':>9}"]
    for source, fmt, part, tokens in zip(sources, formats, parts, token_counts, strict=True):
        lines.append(f"{source.name[-48:]:<48} {fmt:<18} {len(part):>7} {len(part) / all_rows:>6.1%} {tokens:>9,}")
    return "\n".join(lines)
