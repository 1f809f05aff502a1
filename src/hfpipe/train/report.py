"""A run's report: report.md and report.html in its output dir, from what the run saved there (config.yaml,
metrics.json, samples.jsonl, the plots) plus the versions of the stack and the git commit."""

from __future__ import annotations

import html
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

from hfpipe import PROJECT_ROOT, __version__
from hfpipe.rundir import CONFIG_FILE, PLOTS, REPORT_HTML, REPORT_MD, SAMPLES_FILE, read_metrics

STACK = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub")


def stack_versions() -> dict[str, str]:
    """Installed versions of hfpipe and the libraries it configures."""
    versions = {"hfpipe": __version__}
    for name in STACK:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the hfpipe checkout the run came from, with '+changes' when its tree was modified."""
    root = PROJECT_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_versions() -> dict[str, str]:
    """What a run records of the software it trained with: the stack's versions and the git commit."""
    return {**stack_versions(), "git commit": git_commit()}


def _samples_by_step(output_dir: Path) -> list[tuple[int, list[dict[str, Any]]]]:
    path = output_dir / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = sorted({row["step"] for row in rows})
    chosen = steps[:1] + steps[-1:] if len(steps) > 1 else steps  # before and after training
    return [(step, [row for row in rows if row["step"] == step]) for step in chosen]


def report_sections(output_dir: Path) -> list[tuple[str, str, Any]]:
    """(title, kind, content) sections: kind is 'code', 'table' (a dict), 'image' (a file name) or 'samples'."""
    config_text = (
        (output_dir / CONFIG_FILE).read_text(encoding="utf-8") if (output_dir / CONFIG_FILE).is_file() else ""
    )
    metrics = read_metrics(output_dir)
    sources = metrics.pop("data_sources", None)
    versions = metrics.pop("versions", None) or run_versions()  # as trained (older runs: as now)
    sections: list[tuple[str, str, Any]] = [
        ("Results", "table", {key: value for key, value in metrics.items() if not isinstance(value, (dict, list))}),
        ("Configuration (as resolved; reruns the run)", "code", config_text),
    ]
    if sources:
        sections.append(("Data sources and shares", "code", sources))
    sections += [(name, "image", name) for name in PLOTS if (output_dir / name).is_file()]
    sections += [(f"Samples at step {step}", "samples", rows) for step, rows in _samples_by_step(output_dir)]
    sections.append(("Versions", "table", versions))
    return sections


def _cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_sections(sections: list[tuple[str, str, Any]], level: int = 2) -> str:
    """Render report sections as markdown under headings of `level`."""
    lines = []
    for heading, kind, content in sections:
        lines += [f"{'#' * level} {heading}", ""]
        if kind == "table":
            lines += ["| key | value |", "| --- | --- |"]
            lines += [f"| {key} | {_cell(value)} |" for key, value in content.items()]
        elif kind == "code":
            lines += ["```", content.rstrip(), "```"]
        elif kind == "image":
            lines.append(f"![{content}]({content})")
        else:
            for row in content:
                lines += ["```", f"{row['prompt']}{row['completion']}".rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


def _markdown(title: str, sections: list[tuple[str, str, Any]]) -> str:
    return f"# {title}\n\n{markdown_sections(sections)}"


def _html(title: str, sections: list[tuple[str, str, Any]]) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"]
    for heading, kind, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if kind == "table":
            rows = "".join(
                f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in content.items()
            )
            parts.append(f"<table>{rows}</table>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(content)}</pre>")
        elif kind == "image":
            parts.append(f"<img src='{html.escape(content)}' alt='{html.escape(content)}'>")
        else:
            parts += [f"<pre>{html.escape(row['prompt'] + row['completion'])}</pre>" for row in content]
    return "\n".join(parts) + "\n"


def write_report(output_dir: Path, run_name: str) -> Path:
    """Write report.md and report.html for a finished run; return the markdown path."""
    sections = report_sections(output_dir)
    title = f"{run_name}: hfpipe run report"
    (output_dir / REPORT_HTML).write_text(_html(title, sections), encoding="utf-8")
    path = output_dir / REPORT_MD
    path.write_text(_markdown(title, sections), encoding="utf-8")
    return path
