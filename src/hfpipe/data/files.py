"""Data files: local files and globs (.txt, .jsonl, .json, .csv, .parquet) or a Hub dataset loaded as `datasets`
tables, each problem one line naming the file; the cache dir; pretraining's raw text splits."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, load_dataset

from hfpipe.errors import DataError, did_you_mean
from hfpipe.lines import jsonl_object, text_lines
from hfpipe.sections import DataArguments

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# In --smoke runs: this many rows, each cut to this many characters.
SMOKE_ROWS = 8
SMOKE_CHARS = 20_000


def cache_root(configured: str | None = None) -> Path:
    """Return the directory for cached tokenizers, tokenized data and converted models."""
    configured = configured or os.environ.get("HFPIPE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hfpipe"


def resolve_files(patterns: list[str], key: str, where: str) -> list[str]:
    """Expand paths and globs; every pattern must match a file of one supported format."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [match for match in matches if os.path.isfile(match)]
        if not matches:
            raise DataError(f"{where}: {key}: no file matches '{pattern}'. Check the path (relative to {os.getcwd()}).")
        files.extend(matches)
    suffixes = {Path(file).suffix.lower() for file in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise DataError(
            f"{where}: {key}: unsupported file type {', '.join(sorted(unknown))}; "
            f"expected one of {', '.join(BUILDERS)}."
        )
    if len({BUILDERS[suffix] for suffix in suffixes}) > 1:
        raise DataError(f"{where}: {key}: mixes file types {', '.join(sorted(suffixes))}; use one type per key.")
    return files


def load_files(files: list[str]) -> Dataset:
    """Load local files of one format as a Dataset with all their columns (.txt: one row per file)."""
    builder = BUILDERS[Path(files[0]).suffix.lower()]
    options: dict[str, Any] = {}
    if builder != "parquet":
        # A UTF-8 BOM may open any text file; datasets' json builder drops it from the first file only.
        options["encoding"] = "utf-8-sig"
    if builder == "text":
        options["sample_by"] = "document"  # one row per .txt file keeps line breaks and lets documents end with EOS
    for file in files:
        _check_file(file, builder)
    try:
        return load_dataset(builder, data_files=files, split="train", **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as error:
        cause = error.__cause__ or error
        raise DataError(f"{', '.join(files)}: could not be read as {builder}: {str(cause).splitlines()[0]}") from None


def _check_file(file: str, builder: str) -> None:
    if os.path.getsize(file) == 0:
        raise DataError(f"{file}: the file is empty. Remove it from the list or add text to it.")
    if builder == "parquet":  # binary; the other formats are UTF-8 text
        return
    is_jsonl = file.lower().endswith(".jsonl")
    blank = True
    for number, line in text_lines(file):
        blank = False
        if is_jsonl:
            jsonl_object(file, number, line)
    if blank:
        holds = "text" if builder == "text" else "rows"
        raise DataError(
            f"{file}: the file has no {holds} (every line is blank). Remove it from the list or add {holds}."
        )


def load_hub(name: str, config: str | None, split: str) -> Dataset:
    """Load one split of a Hub dataset; any failure (offline, auth, missing split) is one DataError line."""
    try:
        return load_dataset(name, config, split=split)
    except Exception as error:  # network, auth or missing split: one line, whatever the cause
        raise DataError(
            f"dataset_name: '{name}' split '{split}' could not be loaded: {str(error).splitlines()[0]}"
        ) from None


def select_text(dataset: Dataset, column: str, source: str) -> Dataset:
    """Keep only the text column, renamed to 'text'."""
    if column not in dataset.column_names:
        raise DataError(
            f"{source}: no column '{column}' (columns: {', '.join(dataset.column_names)}). "
            f"Set text_column.{did_you_mean(column, dataset.column_names)}"
        )
    dataset = dataset.select_columns([column])
    return dataset if column == "text" else dataset.rename_column(column, "text")


def load_raw_splits(data_args: DataArguments, where: str, smoke: bool = False) -> DatasetDict:
    """Load the raw text as a DatasetDict with 'train' and, when given, 'validation' (one 'text' column)."""
    column = data_args.text_column
    splits = DatasetDict()
    if data_args.train_files:
        files = resolve_files(data_args.train_files, "train_files", where)
        splits["train"] = select_text(load_files(files), column, files[0])
    else:
        hub = load_hub(data_args.dataset_name, data_args.dataset_config, data_args.dataset_train_split)
        splits["train"] = select_text(hub, column, data_args.dataset_name)
    if data_args.validation_files:
        files = resolve_files(data_args.validation_files, "validation_files", where)
        splits["validation"] = select_text(load_files(files), column, files[0])
    elif data_args.dataset_name and data_args.dataset_test_split:
        hub = load_hub(data_args.dataset_name, data_args.dataset_config, data_args.dataset_test_split)
        splits["validation"] = select_text(hub, column, data_args.dataset_name)
    if smoke:
        splits = DatasetDict(
            {
                name: split.select(range(min(len(split), SMOKE_ROWS))).map(
                    lambda row: {"text": row["text"][:SMOKE_CHARS]}
                )
                for name, split in splits.items()
            }
        )
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"{where}: the {name} data is empty. Point it at files with text in them.")
    return splits
