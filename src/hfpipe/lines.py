"""Lines of UTF-8 text and JSONL files, read with one-line errors that name the file and line: a BOM at the start is
skipped, blank lines are passed over, a line that is not a JSON object says what it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from hfpipe.errors import DataError


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file as (line number, line), without the BOM a file may open with; a line
    that is not UTF-8 is a one-line DataError."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # A BOM is legal at the start of a UTF-8 file (Windows editors write one) and is not text.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}: line {number} is not UTF-8 (byte {error.start}). Re-save the file as UTF-8."
                ) from None
            if line.strip():
                yield number, line


JSON_KINDS = {list: "an array", str: "a string", bool: "true or false", int: "a number", float: "a number"}


def jsonl_object(path: str, number: int, line: str) -> dict[str, Any]:
    """Line `number` of a JSONL file as its object; a line that is not JSON, or JSON but no object, is a one-line
    DataError naming the line."""
    try:
        row = json.loads(line)
    except ValueError as error:
        raise DataError(f"{path}: line {number} is not valid JSON ({error.msg}). Fix or remove it.") from None
    if not isinstance(row, dict):
        kind = JSON_KINDS.get(type(row), "null")
        raise DataError(
            f"{path}: line {number} is not a JSON object (it is {kind}). Write one {{...}} object per line."
        )
    return row
