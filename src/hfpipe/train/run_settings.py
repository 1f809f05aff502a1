"""The run conventions every stage's config starts from, and the settings derived from them: run name, output dir,
checkpoint steps, --smoke; the checks of the output dir and report_to; where trackio keeps its store. Nothing here
loads or writes files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from hfpipe.errors import ConfigError, did_you_mean
from hfpipe.rundir import HUB_RECORD, TRACKIO_DIR, is_finished


def check_not_finished(output_dir: Path, overwrite: bool, where: str, hint: str = "") -> None:
    """Refuse to touch a finished run unless the config asks to overwrite it; `hint` ends the message."""
    if is_finished(output_dir) and not overwrite:
        raise ConfigError(
            f"{where}: output_dir '{output_dir}' holds a finished run. Set another output_dir, or "
            f"overwrite_output_dir: true to replace it{hint}."
        )


# Every recipe's run conventions, on top of which each sets its own: log often, evaluate and checkpoint on the same
# steps, keep the best checkpoint beside the latest, checkpoint on SIGTERM, report to no service unless asked,
# no search for unused parameters under DDP (every weight of a causal LM gets a gradient).
RUN_DEFAULTS: dict[str, Any] = {
    "logging_steps": 10,
    "eval_strategy": "steps",
    "save_strategy": "steps",
    "save_total_limit": 2,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    "enable_jit_checkpoint": True,
    "report_to": "none",
    "ddp_find_unused_parameters": False,
}

# --smoke: a few steps that still evaluate, checkpoint and log every step, into outputs/smoke/.
SMOKE_SETTINGS: dict[str, Any] = {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}


def derive_run_settings(values: dict[str, Any], default_run_name: str) -> None:
    """Fill in run_name, output_dir and save_steps (smoke runs included), on the merged config values before the
    dataclasses are built."""
    if not values.get("run_name"):
        values["run_name"] = Path(values["output_dir"]).name if values.get("output_dir") else default_run_name
    if values.get("smoke"):
        values.update(SMOKE_SETTINGS)
        values["output_dir"] = str(Path("outputs") / "smoke" / values["run_name"])
        values["overwrite_output_dir"] = True
    elif not values.get("output_dir"):
        values["output_dir"] = str(Path("outputs") / values["run_name"])
    if values.get("save_steps") is None or values.get("smoke"):
        # Checkpoints at evaluation steps, so that the best checkpoint by validation loss exists on disk.
        values["save_steps"] = values["eval_steps"] or 500


def check_output_dir(values: dict[str, Any], where: str) -> None:
    """Refuse an output_dir the run cannot write (a file, under a file, or in a directory this user cannot write),
    and a finished one unless overwrite_output_dir; say how to push it when the config wants a push."""
    output_dir = Path(values["output_dir"])
    _check_writable(output_dir, where)
    unpushed = values.get("push_to_hub") and not (output_dir / HUB_RECORD).is_file()
    hint = f" (to push it as it is: hfpipe push {output_dir})" if unpushed else ""
    check_not_finished(output_dir, values["overwrite_output_dir"], where, hint)


def _check_writable(output_dir: Path, where: str) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(
            f"{where}: output_dir: '{output_dir}' is a file, not a directory; expected a directory for the run. "
            "Set another output_dir, or move the file."
        )
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{where}: output_dir: '{output_dir}' cannot be created: '{existing}' is a file. Set another output_dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{where}: output_dir: '{output_dir}' cannot be written: '{existing}' is not writable by this user. "
            "Set another output_dir, or make that directory writable."
        )


# "none" and "all" are TrainingArguments.report_to's words, each valid only on its own; the rest name integrations.
REPORT_TO_WORDS = ("none", "all")


def check_report_to(values: dict[str, Any], where: str) -> None:
    """Refuse a report_to that transformers would reject only once the trainer is built, after the model has loaded:
    "none", "all", or one or a list of the integrations transformers knows (wandb, tensorboard, ...)."""
    report_to = values.get("report_to")
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    integrations = list(INTEGRATION_TO_CALLBACK)
    for name in names:
        if name in integrations or (name in REPORT_TO_WORDS and len(names) == 1):
            continue
        if name in REPORT_TO_WORDS:
            hint = " 'none' and 'all' stand alone, not in a list."
        else:
            hint = did_you_mean(str(name), [*REPORT_TO_WORDS, *integrations])
        raise ConfigError(
            f"{where}: report_to: {name!r} is not valid; expected none, all, or one or a list of "
            f"{', '.join(integrations)}.{hint}"
        )


# The TRACKIO_DIR this process set for an earlier run (tests, notebooks), told apart from one the user set.
_trackio_dir_set_here: str | None = None


def keep_trackio_in_run_dir(report_to: list[str], output_dir: Path) -> Path | None:
    """For a run that reports to trackio, point trackio's local store (its SQLite project files) at
    <output_dir>/trackio unless the user set TRACKIO_DIR; return the dir trackio writes to, None without trackio.

    Call it at the start of the run, before the trainer imports trackio: trackio reads TRACKIO_DIR once, at import.
    """
    global _trackio_dir_set_here
    if "trackio" not in report_to:
        return None
    chosen = os.environ.get("TRACKIO_DIR")
    if chosen and chosen != _trackio_dir_set_here:
        return Path(chosen)
    wanted = str((output_dir / TRACKIO_DIR).absolute())
    imported = sys.modules.get("trackio.utils")
    if imported is not None and str(imported.TRACKIO_DIR) != wanted:
        print(
            f"warning: report_to: trackio was imported before this run, so it logs to {imported.TRACKIO_DIR}, not "
            f"{wanted}; to choose, set TRACKIO_DIR before trackio is first imported."
        )
        return Path(imported.TRACKIO_DIR)
    os.environ["TRACKIO_DIR"] = _trackio_dir_set_here = wanted
    return Path(wanted)
