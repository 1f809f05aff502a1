"""The shared tail of every recipe: output dir rules, resume, train, save, evaluate, metrics, plots."""

from __future__ import annotations

import datetime
import enum
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import Trainer

from hfpipe import __version__
from hfpipe.config import public_settings
from hfpipe.errors import ConfigError
from hfpipe.hub import HUB_RECORD
from hfpipe.plots import plot_losses
from hfpipe.report import run_versions, write_report

METRICS_FILE = "metrics.json"  # written last: its presence marks a finished run
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
TRAINER_STATE = "trainer_state.json"
SIGTERM_EXIT_CODE = 143


def is_finished(output_dir: Path) -> bool:
    """True when `output_dir` holds a run that trained to the end."""
    return (output_dir / METRICS_FILE).is_file()


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


def derive_run_settings(values: dict[str, Any], default_run_name: str, where: str) -> None:
    """Fill in run_name, output_dir and save_steps (smoke runs included); refuse a finished output_dir.

    Works on the merged config values before the dataclasses are built.
    """
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
    output_dir = Path(values["output_dir"])
    unpushed = values.get("push_to_hub") and not (output_dir / HUB_RECORD).is_file()
    hint = f" (to push it as it is: hfpipe push {output_dir})" if unpushed else ""
    check_not_finished(output_dir, values["overwrite_output_dir"], where, hint)


def _checkpoint_is_complete(checkpoint: Path) -> bool:
    # The Trainer writes trainer_state.json after weights, optimizer and RNG states.
    if (checkpoint / INCOMPLETE_MARKER).exists():
        return False
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """Return the newest checkpoint that was completely written; delete newer half-written ones."""
    if not output_dir.is_dir():
        return None
    checkpoints = sorted(
        (path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)),
        key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if _checkpoint_is_complete(checkpoint):
            return checkpoint
        print(f"Removing {checkpoint}: it was not completely written (the run was killed while saving).")
        shutil.rmtree(checkpoint)
    return None


def prepare_output_dir(output_dir: Path, overwrite: bool, where: str, is_main_process: bool) -> Path | None:
    """Apply the output dir rules; return the checkpoint to resume from, if any.

    Call it on the main process first (`training_args.main_process_first()`): only the main process deletes.
    """
    if overwrite:
        if is_main_process and output_dir.exists():
            print(f"overwrite_output_dir: starting afresh in {output_dir}")
            shutil.rmtree(output_dir)
        return None
    check_not_finished(output_dir, overwrite, where)
    return last_complete_checkpoint(output_dir)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def save_resolved_config(output_dir: Path, recipe: str, settings: dict[str, Any]) -> Path:
    """Write the settings of this run as a config that reruns it (secrets removed)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yaml"
    header = f"# accelerate launch recipes/{recipe}.py --config {path}\n"
    body = yaml.safe_dump(_plain(public_settings(settings)), sort_keys=False, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")
    return path


def config_changes(output_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Compare the settings of a resumed run with the config.yaml its first launch saved; describe each change."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current = _plain(public_settings(settings))
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def save_run_config(output_dir: Path, recipe: str, settings: dict[str, Any], resuming: bool) -> None:
    """Save config.yaml; when resuming, first say which settings differ from the interrupted launch."""
    if resuming:
        for change in config_changes(output_dir, settings):
            print(f"warning: resuming with a changed setting: {change}")
    save_resolved_config(output_dir, recipe, settings)


def train(trainer: Trainer, resume_from: Path | None) -> None:
    """Train, resuming from `resume_from`; exit with 143 when SIGTERM stopped the run after a checkpoint."""
    if resume_from is not None:
        print(f"Resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    if state.max_steps and state.global_step < state.max_steps:
        print(
            f"Training stopped at step {state.global_step} of {state.max_steps}; a checkpoint is in "
            f"{trainer.args.output_dir}. Run the same command to resume.",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT_CODE)


def finish(trainer: Trainer, run_name: str, extra_metrics: dict[str, Any]) -> dict[str, Any]:
    """Save the final model, evaluate it, write loss.png and metrics.json (last); return the metrics."""
    return write_records(trainer, run_name, save_and_evaluate(trainer), extra_metrics)


def save_and_evaluate(trainer: Trainer) -> dict[str, Any]:
    """Save the final model (or adapter) with its tokenizer and generation config; return the final evaluation."""
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero() and getattr(trainer.model, "generation_config", None) is not None:
        trainer.model.generation_config.save_pretrained(output_dir)  # adapters too: generation must stop at EOS
    return _final_evaluation(trainer)


def write_records(
    trainer: Trainer, run_name: str, eval_metrics: dict[str, Any], extra_metrics: dict[str, Any]
) -> dict[str, Any]:
    """Write loss.png, metrics.json (it marks the run finished) and the report; return the metrics (main process)."""
    if not trainer.is_world_process_zero():
        return {}
    output_dir = Path(trainer.args.output_dir)
    state = trainer.state
    metrics: dict[str, Any] = {
        "run_name": run_name,
        "global_step": state.global_step,
        "train_loss": _last(state.log_history, "loss"),
        "train_runtime": _last(state.log_history, "train_runtime"),
        **{key: value for key, value in eval_metrics.items() if key.startswith("eval_")},
        "eval_loss_at_start": next(
            (entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry and entry.get("step") == 0), None
        ),
        **extra_metrics,
        "best_checkpoint": state.best_model_checkpoint,
        "best_eval_loss": state.best_metric,
        "hfpipe_version": __version__,
        "versions": run_versions(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    plot_losses(state.log_history, output_dir / "loss.png", run_name)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(output_dir, run_name)
    return metrics


def _final_evaluation(trainer: Trainer) -> dict[str, Any]:
    # The last step often was an evaluation step already: reuse it rather than evaluate twice.
    state = trainer.state
    done = [entry for entry in state.log_history if "eval_loss" in entry and entry.get("step") == state.global_step]
    if done:
        return done[-1]
    return trainer.evaluate() if trainer.eval_dataset is not None else {}


def _last(log_history: list[dict[str, Any]], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return values[-1] if values else None
