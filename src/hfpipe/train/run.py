"""A training run from start to finish, the same for every stage: the recipe parses its config and calls
`start_run` before it loads anything, builds its trainer with `run.callbacks(...)`, then `run.train(trainer)` and
`run.finish(...)`. What happens in between is the stage's own.

`start_run`: CPU threads, the push request taken off the Trainer (and the token off its pickled arguments), the
output dir rules (refuse a finished run, start afresh on overwrite_output_dir, else resume from the last complete
checkpoint), the seed. `Run.train`: the throughput log, config.yaml (with a warning for each setting changed since an
interrupted launch), training with resume, the final model with its tokenizer and generation config, the final
evaluation. `Run.finish` (main process): the config's `eval_*` tasks, the merged copy (merge_adapter), loss.png,
metrics.json (last: it marks the run finished), the report, the summary line, and the push.
"""

from __future__ import annotations

import datetime
import enum
import errno
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed

from hfpipe import __version__
from hfpipe.config import ParsedConfig, public_settings
from hfpipe.devices import use_cpu_cores
from hfpipe.errors import DiskFullError
from hfpipe.evaluation.evaluate import EvalArguments, evaluate_after_training
from hfpipe.hub.publish import HubTarget, push_run, take_push_request
from hfpipe.rundir import (
    CONFIG_FILE,
    LOSS_PLOT,
    MERGED_DIR,
    METRICS_FILE,
    RUN_LOCK,
    hold_run_lock,
    last_complete_checkpoint,
    release_run_lock,
)
from hfpipe.sections import RunArguments, TuningArguments
from hfpipe.stages import get_stage
from hfpipe.train.callbacks import LogExtrasCallback, SampleCallback, TrainLogCallback
from hfpipe.train.plots import plot_losses
from hfpipe.train.report import run_versions, write_report
from hfpipe.train.run_settings import check_not_finished, keep_trackio_in_run_dir

SIGTERM_EXIT_CODE = 143


@dataclass
class Run:
    """One training run of a stage, between `start_run` and `Run.finish`."""

    stage: str
    parsed: ParsedConfig
    training_args: TrainingArguments
    run_args: RunArguments
    output_dir: Path
    resume_from: Path | None
    hub: HubTarget | None
    threads: int
    log_extras: LogExtrasCallback | None = None
    eval_metrics: dict[str, Any] | None = None

    @property
    def device(self) -> str:
        """Where and in what precision it trains, for the setup line: 'CPU, 2 threads, fp32', 'accelerator, ...'."""
        precision = "bf16 autocast" if self.training_args.bf16 else "fp16" if self.training_args.fp16 else "fp32"
        return f"{f'CPU, {self.threads} threads' if self.training_args.use_cpu else 'accelerator'}, {precision}"

    def callbacks(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *extra: TrainerCallback) -> list:
        """The trainer's callbacks: sample generations at each evaluation (the config's sample_prompts, else
        `prompts`), then `extra`."""
        prompts = self.run_args.sample_prompts or prompts
        return [SampleCallback(tokenizer, prompts, self.run_args.sample_max_new_tokens), *extra]

    def train(self, trainer: Trainer, tokens_per_step: int | None = None, perplexity: bool = True) -> None:
        """Save config.yaml, train (resuming when a checkpoint is there), save the final model and evaluate it.

        `tokens_per_step` for fixed-size batches (else the real tokens the Trainer counted); `perplexity=False` for
        losses that are not cross-entropy.
        """
        self.log_extras = LogExtrasCallback(tokens_per_step, perplexity)
        trainer.callback_handler.callbacks.insert(0, self.log_extras)  # before the printer: it adds to the logs
        trainer.callback_handler.callbacks.insert(1, TrainLogCallback())
        if self.training_args.process_index == 0:
            settings = get_stage(self.stage).resolved_settings(self.parsed)
            save_run_config(self.output_dir, self.stage, settings, resuming=self.resume_from is not None)
        train(trainer, self.resume_from)
        self.eval_metrics = save_and_evaluate(trainer)

    def finish(
        self,
        trainer: Trainer,
        tokenizer: PreTrainedTokenizerBase,
        extra: dict[str, Any],
        summary: Callable[[dict[str, Any]], str],
    ) -> dict[str, Any]:
        """Evaluate on the config's eval_* tasks, merge the adapter when asked, write the records, print
        'Done: <dir> | summary(metrics)' and push; return the metrics (empty on other processes)."""
        extra = {"train_tokens_per_second": round(self.log_extras.tokens_per_second, 1), **extra}
        if trainer.is_world_process_zero():
            extra.update(evaluate_after_training(trainer, tokenizer, self.parsed.get(EvalArguments)))
            tuning = self.parsed.find(TuningArguments)
            if tuning is not None and tuning.merge_adapter:
                from hfpipe.models.trained import save_merged_model

                extra["merged_model"] = str(save_merged_model(self.output_dir, self.output_dir / MERGED_DIR))
        metrics = write_records(trainer, self.stage, self.training_args.run_name, self.eval_metrics or {}, extra)
        if metrics:
            print(f"Done: {self.output_dir} | {summary(metrics)}")
            if self.hub is not None:
                push_run(self.output_dir, self.hub)
        release_run_lock(self.output_dir)
        return metrics


def start_run(stage: str, parsed: ParsedConfig) -> Run:
    """Begin a run of `stage` from its parsed config, before anything is loaded (see the module docstring)."""
    training_args, run_args = parsed.values[0], parsed.get(RunArguments)
    output_dir = Path(training_args.output_dir)
    threads = use_cpu_cores(training_args.use_cpu)
    hub = take_push_request(training_args, run_args)
    # One run per output dir: the main process holds the lock until it exits.
    if training_args.process_index == 0:
        hold_run_lock(output_dir, str(parsed.path))
    with training_args.main_process_first(desc="preparing the output dir"):
        resume_from = prepare_output_dir(
            output_dir, run_args.overwrite_output_dir, str(parsed.path), training_args.process_index == 0
        )
    keep_trackio_in_run_dir(training_args.report_to, output_dir)
    set_seed(training_args.seed)
    return Run(stage, parsed, training_args, run_args, output_dir, resume_from, hub, threads)


def prepare_output_dir(output_dir: Path, overwrite: bool, where: str, is_main_process: bool) -> Path | None:
    """Apply the output dir rules; return the checkpoint to resume from, if any.

    Call it on the main process first (`training_args.main_process_first()`): only the main process deletes.
    """
    if overwrite:
        if is_main_process and output_dir.exists():
            print(f"overwrite_output_dir: starting afresh in {output_dir}")
            for entry in output_dir.iterdir():
                if entry.name == RUN_LOCK:
                    continue  # this run's own lock, held
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
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
    path = output_dir / CONFIG_FILE
    header = f"# accelerate launch recipes/{recipe}.py --config {path}\n"
    body = yaml.safe_dump(_plain(public_settings(settings)), sort_keys=False, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")
    return path


def config_changes(output_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Compare the settings of a resumed run with the config.yaml its first launch saved; describe each change."""
    saved_path = output_dir / CONFIG_FILE
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
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as error:
        if not is_disk_full(error, Path(trainer.args.output_dir)):
            raise
        output_dir = Path(trainer.args.output_dir)
        kept = last_complete_checkpoint(output_dir)  # removes the half-written one
        then = f"{kept.name}, the last complete checkpoint, is kept" if kept else "No checkpoint is complete"
        raise DiskFullError(
            f"{output_dir}: the disk is full: a checkpoint could not be written at step {trainer.state.global_step} "
            f"({str(error).splitlines()[0][:160]}). {then}: free some space and run the same command again."
        ) from None
    state = trainer.state
    if state.max_steps and state.global_step < state.max_steps:
        print(
            f"Training stopped at step {state.global_step} of {state.max_steps}; a checkpoint is in "
            f"{trainer.args.output_dir}. Run the same command to resume.",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT_CODE)


def is_disk_full(error: BaseException, output_dir: Path) -> bool:
    """Whether `error` is a write that failed for lack of space: ENOSPC, or the messages safetensors and torch.save
    give for it (theirs name no errno, so a failed write on a disk with almost no space left counts too)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    message = str(error)
    if "No space left on device" in message or "os error 28" in message or "StorageFull" in message:
        return True
    wrote = "failed writing file" in message or "Error while serializing" in message
    return wrote and shutil.disk_usage(output_dir).free < 256 * 2**20


def save_and_evaluate(trainer: Trainer) -> dict[str, Any]:
    """Save the final model (or adapter) with its tokenizer and generation config; return the final evaluation."""
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero() and getattr(trainer.model, "generation_config", None) is not None:
        trainer.model.generation_config.save_pretrained(output_dir)  # adapters too: generation must stop at EOS
    return _final_evaluation(trainer)


def write_records(
    trainer: Trainer, stage: str, run_name: str, eval_metrics: dict[str, Any], extra_metrics: dict[str, Any]
) -> dict[str, Any]:
    """Write loss.png, metrics.json (it marks the run finished) and the report; return the metrics (main process)."""
    if not trainer.is_world_process_zero():
        return {}
    output_dir = Path(trainer.args.output_dir)
    state = trainer.state
    metrics: dict[str, Any] = {
        "stage": stage,
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
    plot_losses(state.log_history, output_dir / LOSS_PLOT, run_name)
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
