"""The run conventions every stage's config starts from, and the settings derived from them: run name, output dir,
checkpoint steps, --smoke. Config-time only: nothing here loads or writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfpipe.errors import ConfigError
from hfpipe.rundir import HUB_RECORD, is_finished


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
    """Refuse a finished output_dir unless overwrite_output_dir; say how to push it when the config wants a push."""
    output_dir = Path(values["output_dir"])
    unpushed = values.get("push_to_hub") and not (output_dir / HUB_RECORD).is_file()
    hint = f" (to push it as it is: hfpipe push {output_dir})" if unpushed else ""
    check_not_finished(output_dir, values["overwrite_output_dir"], where, hint)
