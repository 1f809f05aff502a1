"""Pretraining text as blocks: tokenized once (documents end with EOS), packed into blocks of block_size, a
validation tail split off when there is no validation data, cached on disk by a fingerprint of data and tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerBase

from hfpipe.data.files import resolve_files
from hfpipe.errors import DataError
from hfpipe.sections import DataArguments

CACHE_FORMAT = 1  # bump when the packed layout changes, so old caches are not reused


def iter_texts(dataset: Dataset, batch_size: int = 64) -> Iterator[str]:
    """Yield the non-empty texts of a one-column text dataset."""
    for batch in dataset.iter(batch_size=batch_size):
        yield from (text for text in batch["text"] if text)


def pack_texts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> Dataset:
    """Tokenize documents, end each with EOS, concatenate and cut into blocks of `block_size` tokens."""
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eos] for ids in encoded]}

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")
    return tokenized.map(group, batched=True, batch_size=1000, desc=f"Packing into blocks of {block_size}")


def data_fingerprint(data_args: DataArguments, where: str, smoke: bool) -> str:
    """A cheap fingerprint of the data sources (paths, sizes, modification times, Hub names)."""
    parts: list[Any] = [CACHE_FORMAT, data_args.text_column, smoke]
    for key in ("train_files", "validation_files"):
        patterns = getattr(data_args, key)
        if patterns:
            for file in resolve_files(patterns, key, where):
                stat = os.stat(file)
                parts.append([key, os.path.abspath(file), stat.st_size, stat.st_mtime_ns])
    if not data_args.train_files:
        parts.append([data_args.dataset_name, data_args.dataset_config, data_args.dataset_train_split])
    if not data_args.validation_files:
        parts.append(data_args.dataset_test_split)
    return fingerprint_of(parts)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A fingerprint of a tokenizer's full definition."""
    return fingerprint_of([tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token])


def fingerprint_of(parts: Any) -> str:
    """A short stable hash of JSON-able parts, for cache keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_blocks(
    raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, cache_dir: Path
) -> DatasetDict:
    """Return packed 'train' and 'validation' blocks, from `cache_dir` when an identical run made them."""
    if (cache_dir / "dataset_dict.json").is_file():
        print(f"Reusing tokenized data from {cache_dir}")
        return load_from_disk(str(cache_dir))
    blocks = DatasetDict({name: pack_texts(split, tokenizer, data_args.block_size) for name, split in raw.items()})
    if "validation" not in blocks:
        blocks = _split_tail(blocks["train"], data_args.validation_split_fraction)
    for name, split in blocks.items():
        if len(split) == 0:
            raise DataError(
                f"the {name} text holds fewer than block_size={data_args.block_size} tokens. "
                "Lower block_size or add text."
            )
    # Write beside, then rename: a run killed mid-write leaves no half cache behind.
    partial = cache_dir.with_name(cache_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    blocks.save_to_disk(str(partial))
    partial.rename(cache_dir)
    return load_from_disk(str(cache_dir))


def cap_validation(blocks: DatasetDict, max_eval_samples: int | None) -> DatasetDict:
    """Keep at most `max_eval_samples` validation blocks, spread evenly over the validation text."""
    validation = blocks["validation"]
    if not max_eval_samples or len(validation) <= max_eval_samples:
        return blocks
    stride = len(validation) / max_eval_samples
    rows = [int(index * stride) for index in range(max_eval_samples)]
    return DatasetDict({"train": blocks["train"], "validation": validation.select(rows)})


def _split_tail(train: Dataset, fraction: float) -> DatasetDict:
    # The last blocks, contiguous as in nanoGPT: less leakage than a random split of neighbouring blocks.
    held_out = max(1, round(len(train) * fraction))
    if len(train) - held_out < 1:
        raise DataError(f"too little training text to hold out {fraction:.0%} for validation; add text.")
    return DatasetDict(
        {
            "train": train.select(range(len(train) - held_out)),
            "validation": train.select(range(len(train) - held_out, len(train))),
        }
    )
