"""The one place the benchmark scripts write their tables into benchmarks/README.md."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def write_marked_table(marker: str, table: str, section_if_missing: str | None = None) -> None:
    """Replace what stands between `<!-- marker -->` and `<!-- /marker -->` in benchmarks/README.md with `table`.

    The file is read right before writing, since other benchmarks write their own sections. When the markers are
    missing, `section_if_missing` (the section's heading and text) is appended with them; without it the script
    stops, naming the marker.
    """
    text = README.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in text:
        if section_if_missing is None:
            raise SystemExit(f"{README}: no {start} marker; add the benchmark's section first.")
        text = text.rstrip("\n") + "\n\n" + section_if_missing + f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    README.write_text(f"{before}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")
