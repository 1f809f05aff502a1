"""Reading and checking the input files of evaluation tasks: every file is found, typed and read, and every row
checked, before any model loads; each problem is a one-line DataError naming the file and line."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfpipe.errors import DataError
from hfpipe.lines import jsonl_object, text_lines


def resolve_inputs(patterns: list[str], key: str, where: str, suffixes: tuple[str, ...]) -> list[str]:
    """Expand paths and globs; each must match at least one file, and every file must end with one of `suffixes`."""
    files = []
    for pattern in patterns:
        matches = sorted(
            path for path in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(path)
        )
        if not matches:
            raise DataError(f"{where}: {key}: no file matches '{pattern}'. Check the path (relative to {os.getcwd()}).")
        files.extend(matches)
    for file in files:
        if not file.lower().endswith(suffixes):
            raise DataError(f"{where}: {key}: {file}: expected a {' or '.join(suffixes)} file.")
    return files


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The non-blank lines of a JSONL file as (line number, object); a bad line is a one-line DataError."""
    rows = [(number, jsonl_object(path, number, line)) for number, line in text_lines(path)]
    if not rows:
        raise DataError(f"{path}: the file has no rows. Remove it from the list or add rows.")
    return rows


def read_texts(path: str) -> list[str]:
    """The documents of a .txt file (the whole file) or of a .jsonl file (each row's 'text')."""
    if path.lower().endswith(".txt"):
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 (byte {error.start}). Re-save the file as UTF-8.") from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty. Remove it from the list or add text to it.")
        return [text]
    texts = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{path}: line {number}: 'text' is missing or empty. Give each row a non-empty 'text'.")
        texts.append(row["text"])
    return texts


def read_rows(path: str, parse: Any) -> list[Any]:
    """Parse every row of a JSONL file with `parse` (a row or a problem); the first problem is a DataError."""
    rows = []
    for number, raw in read_jsonl(path):
        row = parse(raw)
        if isinstance(row, str):
            raise DataError(f"{path}: line {number}: {row}. Fix the row.")
        row.origin = f"{path}: line {number}"
        rows.append(row)
    return rows


@dataclass(frozen=True)
class FileReader:
    """The reader of a task whose inputs are files: paths or globs, each file ending with one of `suffixes`, read
    into checked rows by `read_file`."""

    suffixes: tuple[str, ...]
    read_file: Callable[[str], list[Any]]

    def __call__(self, patterns: list[str], where: str, key: str) -> list[Any]:
        """The rows of every file `patterns` match, in order; all files are found and typed before any is read."""
        return [row for path in resolve_inputs(patterns, key, where, self.suffixes) for row in self.read_file(path)]
