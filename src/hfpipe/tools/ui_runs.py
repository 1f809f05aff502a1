"""What `hfpipe ui` shows of the run dirs under a folder: each run's stage, status, key metrics, curves, samples and
config, and the differences between runs. Read only: nothing here writes, moves or deletes a file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hfpipe.errors import ConfigError
from hfpipe.rundir import (
    CHECKPOINT_PATTERN,
    CONFIG_FILE,
    SAMPLES_FILE,
    TRAIN_LOG,
    TRAINER_STATE,
    is_finished,
    lock_holder,
    read_metrics,
    stage_of,
)
from hfpipe.stages import STAGES

# The curves a run page draws, each from the log keys present in the run's log.
CURVES: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "eval_loss"),
    "rewards": ("reward", "eval_rewards/accuracies", "eval_accuracy", "rewards/accuracies"),
}
SUMMARY_KEYS = ("train_loss", "eval_loss", "global_step")
UNSET = "(not set)"


@dataclass(frozen=True)
class RunRef:
    """A run dir under the UI's folder, named by its path relative to that folder ('quickstart/sft')."""

    root: Path
    name: str

    @property
    def path(self) -> Path:
        """The run dir."""
        return self.root / self.name


def find_runs(root: Path) -> list[RunRef]:
    """The run dirs under `root` (any depth): dirs with the config.yaml a training stage saves, checkpoints and
    merged copies left out; sorted by name."""
    runs = []
    for config in root.glob(f"**/{CONFIG_FILE}"):
        run_dir = config.parent
        if CHECKPOINT_PATTERN.match(run_dir.name) or stage_of(run_dir) not in STAGES:
            continue
        runs.append(RunRef(root, run_dir.relative_to(root).as_posix() if run_dir != root else "."))
    return sorted(runs, key=lambda run: run.name)


def resolve_run(root: Path, name: str) -> RunRef:
    """The run called `name` under `root`; ConfigError for a name outside `root` or a dir that is not a run."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ConfigError(f"{name}: not a run under {root}.")
    if not (path / CONFIG_FILE).is_file() or stage_of(path) not in STAGES:
        raise ConfigError(f"{name}: no run there (a run dir holds the {CONFIG_FILE} its stage saved).")
    return RunRef(root, name)


def status_of(run_dir: Path) -> str:
    """'running' while a process holds the run's lock, 'finished' once metrics.json is written, else
    'interrupted' (it stopped before the end; the same command resumes it)."""
    if lock_holder(run_dir) is not None:
        return "running"
    return "finished" if is_finished(run_dir) else "interrupted"


def log_entries(run_dir: Path) -> list[dict[str, Any]]:
    """The run's log entries: train_log.jsonl as written while it trains, else (a run from before that file) the log
    history of its newest readable checkpoint."""
    log = run_dir / TRAIN_LOG
    if log.is_file():
        return [entry for line in log.read_text(encoding="utf-8").splitlines() if (entry := _json_object(line))]
    checkpoints = sorted(
        (path for path in run_dir.iterdir() if CHECKPOINT_PATTERN.match(path.name)),
        key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)),
        reverse=True,
    )
    for checkpoint in checkpoints:
        state = _json_object((checkpoint / TRAINER_STATE).read_text()) if (checkpoint / TRAINER_STATE).is_file() else {}
        if state.get("log_history"):
            return state["log_history"]
    return []


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}  # a line being written as it is read
    return value if isinstance(value, dict) else {}


def curves(entries: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """Each curve of CURVES with data: {curve: {log key: [[step, value], ...]}}."""
    found: dict[str, dict[str, list[list[float]]]] = {}
    for curve, keys in CURVES.items():
        series = {key: _series(entries, key) for key in keys}
        series = {key: points for key, points in series.items() if points}
        if series:
            found[curve] = series
    return found


def _series(entries: list[dict[str, Any]], key: str) -> list[list[float]]:
    return [
        [entry["step"], entry[key]]
        for entry in entries
        if "step" in entry and isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])
    ]


def run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved settings the run saved in config.yaml."""
    try:
        settings = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return settings if isinstance(settings, dict) else {}


def key_metrics(run_dir: Path) -> dict[str, Any]:
    """The figures a runs list shows: a finished run's training summary and its stage's key numbers."""
    from hfpipe.tools.pipeline import KEY_METRICS

    if not is_finished(run_dir):
        return {}
    metrics = read_metrics(run_dir)
    return {key: metrics[key] for key in (*SUMMARY_KEYS, *KEY_METRICS) if isinstance(metrics.get(key), (int, float))}


def samples_before_after(run_dir: Path) -> list[dict[str, Any]]:
    """The samples of the run's first and last sampled steps, paired by prompt: [{prompt, before, after}]."""
    path = run_dir / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = [row for line in path.read_text(encoding="utf-8").splitlines() if (row := _json_object(line))]
    steps = sorted({row.get("step", 0) for row in rows})
    if not steps:
        return []
    first = {row["prompt"]: row.get("completion", "") for row in rows if row.get("step", 0) == steps[0]}
    last = {row["prompt"]: row.get("completion", "") for row in rows if row.get("step", 0) == steps[-1]}
    return [
        {"prompt": prompt, "before": answer, "after": last.get(prompt), "steps": [steps[0], steps[-1]]}
        for prompt, answer in first.items()
    ]


def summary(run: RunRef) -> dict[str, Any]:
    """One line of the runs list."""
    run_dir = run.path
    settings = run_config(run_dir)
    stage = STAGES[stage_of(run_dir)]
    return {
        "name": run.name,
        "stage": stage.name,
        "status": status_of(run_dir),
        "generates": stage.generates,
        "model": settings.get("model_name_or_path"),
        "metrics": key_metrics(run_dir),
    }


def details(run: RunRef) -> dict[str, Any]:
    """Everything a run's page shows: its summary, curves, samples, saved config and the process training it."""
    run_dir = run.path
    entries = log_entries(run_dir)
    steps = [entry["step"] for entry in entries if "step" in entry]
    return {
        **summary(run),
        "step": max(steps, default=0),
        "max_steps": run_config(run_dir).get("max_steps"),
        "holder": lock_holder(run_dir),
        "curves": curves(entries),
        "samples": samples_before_after(run_dir),
        "config": (run_dir / CONFIG_FILE).read_text(encoding="utf-8"),
    }


def config_diff(settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys whose values differ between runs' settings: [{key, values: one per run, UNSET where absent}]."""
    keys = sorted({key for one in settings for key in one})
    rows = []
    for key in keys:
        values = [one.get(key, UNSET) for one in settings]
        if any(value != values[0] for value in values[1:]):
            rows.append({"key": key, "values": [_shown(value) for value in values]})
    return rows


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def compare(runs: list[RunRef]) -> dict[str, Any]:
    """Runs side by side: the config keys that differ, each run's metrics, curves and samples."""
    if len(runs) < 2:
        raise ConfigError("compare needs two or more runs.")
    return {
        "runs": [details(run) for run in runs],
        "config_diff": config_diff([run_config(run.path) for run in runs]),
    }
