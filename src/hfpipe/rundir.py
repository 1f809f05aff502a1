"""The run directory: a loadable HF model dir (or adapter dir) plus the run's records, all named here.

    outputs/<run_name>/
      model.safetensors, config.json, tokenizer files, generation_config.json   (or adapter_*.json/.safetensors)
      config.yaml        the resolved config; its first line is the command that reruns it
      metrics.json       written last: its presence marks a finished run; records the stage
      samples.jsonl      generations at each evaluation
      train_log.jsonl    each training and evaluation log entry, written as it is logged (curves of a live run)
      loss.png, rewards.png, report.md, report.html
      checkpoint-N/      the Trainer's checkpoints (resume picks the newest complete one)
      merged/            base + adapter merged (merge_adapter: true, or at push time)
      sft-merged/        DPO of an SFT adapter with sft_adapter: merge: the merged SFT model it starts from
      hub_push.json      where and when the run was pushed
      .hfpipe-run.lock   held by the process training into the dir (released when it ends, however it ends)
      eval_results*.json `hfpipe eval` results
      gguf/TYPE/         `hfpipe export`: RUN_NAME-TYPE.gguf and its Ollama Modelfile; export.json records each check
      runs/DATE_HOST/    report_to: tensorboard: the Trainer's TensorBoard event files (transformers' own default)
      trackio/           report_to: trackio: trackio's local store, PROJECT.db (SQLite), unless TRACKIO_DIR is set
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

from hfpipe.errors import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"
TRAIN_LOG = "train_log.jsonl"
LOSS_PLOT = "loss.png"
REWARD_PLOT = "rewards.png"
PLOTS = (LOSS_PLOT, REWARD_PLOT)
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
HUB_RECORD = "hub_push.json"
EVAL_RESULTS = "eval_results.json"  # a pipeline's eval stage; `hfpipe eval` adds a timestamp (eval_results_name)
MERGED_DIR = "merged"
GGUF_DIR = "gguf"  # hfpipe export: gguf/<type>/<run name>-<type>.gguf
MODELFILE = "Modelfile"  # beside each exported .gguf
EXPORT_RECORD = "export.json"  # one entry per exported file
MERGED_SFT_DIR = "sft-merged"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
RUN_LOCK = ".hfpipe-run.lock"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"  # the Trainer's own, while a checkpoint is written
TRAINER_STATE = "trainer_state.json"
TRACKIO_DIR = "trackio"  # report_to: trackio, unless the user set TRACKIO_DIR


def eval_results_name(now: datetime.datetime) -> str:
    """The file name `hfpipe eval` writes its results to when run at `now`: eval_results-YYYYmmdd-HHMMSS.json."""
    stem, suffix = EVAL_RESULTS.rsplit(".", 1)
    return f"{stem}-{now:%Y%m%d-%H%M%S}.{suffix}"


def is_finished(run_dir: Path) -> bool:
    """True when `run_dir` holds a run that trained to the end."""
    return (run_dir / METRICS_FILE).is_file()


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The metrics.json of a finished run."""
    return json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))


def stage_of(run_dir: Path) -> str | None:
    """The stage that trained `run_dir`, as the run recorded it; None for a dir no hfpipe stage wrote.

    A finished run records it in metrics.json; an unfinished one (or one finished before stages were recorded) is
    known by the command line its saved config.yaml begins with.
    """
    from hfpipe.stages import stage_named_in

    if is_finished(run_dir):
        stage = read_metrics(run_dir).get("stage")
        if stage:
            return str(stage)
    config = run_dir / CONFIG_FILE
    return stage_named_in(config) if config.is_file() else None


def latest_finished_run(outputs_dir: Path = Path("outputs")) -> tuple[Path, str]:
    """The newest finished run of the highest-ranked stage under `outputs_dir` (the registry's `pick_rank`: DPO over
    SFT over pretrain) and its stage; ConfigError when there is none."""
    from hfpipe.stages import STAGES

    candidates = []
    for metrics in outputs_dir.glob(f"**/{METRICS_FILE}"):
        stage = STAGES.get(stage_of(metrics.parent) or "")
        if stage is not None and stage.pick_rank is not None:
            candidates.append((stage.pick_rank, metrics.stat().st_mtime, metrics.parent, stage.name))
    if not candidates:
        raise ConfigError(f"{outputs_dir}: no finished run found. Name a model dir, or train one first.")
    _, _, run_dir, stage = max(candidates)
    return run_dir, stage


def model_or_latest_run(name: str | None) -> tuple[str, str]:
    """The model a tool uses and how it was picked: `name` and "" when given, else the latest finished run under
    outputs/ and "the newest finished <stage> run under outputs/"."""
    if name is not None:
        return name, ""
    run_dir, stage = latest_finished_run()
    return str(run_dir), f"the newest finished {stage} run under outputs/"


def adapter_base(model_dir: Path) -> str | None:
    """The base model an adapter dir was trained on; None when `model_dir` holds no adapter."""
    config_path = model_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        return None
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config_path}: base_model_name_or_path is missing; the adapter's base is unknown.")
    return str(base)


def _checkpoint_is_complete(checkpoint: Path) -> bool:
    # The Trainer writes trainer_state.json after weights, optimizer and RNG states.
    if (checkpoint / INCOMPLETE_MARKER).exists():
        return False
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was completely written; newer half-written ones are deleted."""
    if not run_dir.is_dir():
        return None
    checkpoints = sorted(
        (path for path in run_dir.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)),
        key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if _checkpoint_is_complete(checkpoint):
            return checkpoint
        print(f"Removing {checkpoint}: it was not completely written (the run was killed while saving).")
        shutil.rmtree(checkpoint)
    return None


_HELD: dict[Path, IO[str]] = {}  # the run dirs this process holds the lock of


def hold_run_lock(run_dir: Path, where: str) -> IO[str]:
    """Take the run dir's lock until `release_run_lock` or the end of this process (an OS lock: it goes with the
    process, so a lock left by a killed run is taken over); a ConfigError naming the process that holds it. A
    process that holds it already (a run in the same process that stopped early) takes it again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    held = _HELD.get(path.resolve())
    if held is not None and path.is_file() and os.fstat(held.fileno()).st_ino == path.stat().st_ino:
        return held
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"{where}: output_dir '{run_dir}' is in use by a run that is still training ({holder}). Wait for it to "
            "end, stop it, or set another output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(f"process {os.getpid()} on {os.uname().nodename}, started {started}")
    handle.flush()
    _HELD[path.resolve()] = handle
    return handle


def release_run_lock(run_dir: Path) -> None:
    """Let go of the run dir's lock this process holds (the run finished)."""
    handle = _HELD.pop((run_dir / RUN_LOCK).resolve(), None)
    if handle is not None:
        handle.close()


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run dir's lock ("process 123 on host, started ..."), None when no live process does."""
    path = run_dir / RUN_LOCK
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
    return None
