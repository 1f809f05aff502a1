"""Run a pipeline file: stages in order (pretrain -> SFT -> DPO -> eval), each its own process.

    hfpipe pipeline configs/quickstart/pipeline.yaml
    hfpipe pipeline configs/quickstart/pipeline.yaml --from sft     # rerun sft and every stage after it

Every stage config is checked before the first stage starts. A training stage runs as `accelerate launch
recipes/<recipe>.py --config FILE`; an SFT or DPO stage starts from the previous training stage's output unless
it sets `from`. A finished stage is skipped on rerun (once a stage runs, every later stage runs again); a failed
stage stops the pipeline with its name and exit code, and what finished is kept. The end is a summary table
(time, losses, key evaluation numbers per stage) and greedy answers of the final model to a few prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfpipe.config import load_yaml_mapping
from hfpipe.errors import USER_ERROR_EXIT_CODE, ConfigError, did_you_mean
from hfpipe.evaluation import tasks as evaluation_tasks
from hfpipe.rundir import EVAL_RESULTS, is_finished, read_metrics
from hfpipe.stages import STAGES, stage_named_in
from hfpipe_launch_hook import Inbox

PIPELINE_KEYS = ("stages", "chat_prompts", "chat_max_new_tokens")
STAGE_KEYS = ("name", "config", "from", "launch_args", "eval")
# The figures the summary shows beside the losses, when a stage's metrics.json has them.
KEY_METRICS = (
    "eval_perplexity",
    "eval_rewards/accuracies",
    "heldout_pair_accuracy_after",  # reward
    "heldout_reward_after",  # grpo
    "heldout_accuracy_after",  # grpo with an exact or numeric reward
    "heldout_policy_preference_after",  # dpo, kto
    "mc_acc",
    "pref_accuracy",
    "text_perplexity",
)


@dataclass
class Stage:
    """One step of a pipeline: a recipe config to train, or an evaluation of the latest training stage."""

    name: str
    recipe: str  # pretrain, sft, dpo or eval
    config: Path | None = None
    source: str | None = None  # the stage whose output this one starts from (or evaluates)
    launch_args: list[str] = field(default_factory=list)
    eval_flags: list[str] = field(default_factory=list)
    output_dir: Path | None = None


def _check_keys(mapping: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key '{key}'.{did_you_mean(str(key), allowed)} Known: {', '.join(allowed)}."
            )


def read_pipeline(path: Path) -> tuple[list[Stage], list[str], int]:
    """Read and check a pipeline file: its stages, the chat prompts and their token budget. Loads nothing."""
    data = load_yaml_mapping(path)
    _check_keys(data, PIPELINE_KEYS, str(path))
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{path}: stages: expected a list of stages ({{name, config}} or {{name, eval}}).")
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages, start=1):
        where = f"{path}: stage {index}"
        if not isinstance(raw, dict) or not raw.get("name"):
            raise ConfigError(f"{where}: expected a mapping with a name, e.g. {{name: sft, config: configs/...}}.")
        _check_keys(raw, STAGE_KEYS, where)
        name = str(raw["name"])
        if any(stage.name == name for stage in stages):
            raise ConfigError(f"{where}: the name '{name}' is used twice; stage names must be unique.")
        stages.append(_read_stage(raw, name, f"{path}: stage '{name}'", stages))
    prompts = data.get("chat_prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise ConfigError(f"{path}: chat_prompts: expected a list of strings.")
    tokens = data.get("chat_max_new_tokens", 48)
    if not isinstance(tokens, int) or tokens <= 0:
        raise ConfigError(f"{path}: chat_max_new_tokens: expected a positive whole number.")
    return stages, prompts, tokens


def _read_stage(raw: dict[str, Any], name: str, where: str, earlier: list[Stage]) -> Stage:
    # A stage starts from (an eval evaluates) the latest earlier model that generates: not a reward model.
    trained = [stage.name for stage in earlier if stage.recipe != "eval" and STAGES[stage.recipe].generates]
    source = raw.get("from", trained[-1] if trained else None)
    if source is not None and source not in trained:
        raise ConfigError(
            f"{where}: from: '{source}' is not an earlier training stage whose model generates."
            f"{did_you_mean(source, trained)}"
        )
    launch_args = raw.get("launch_args", [])
    if not isinstance(launch_args, list):
        raise ConfigError(f"{where}: launch_args: expected a list, e.g. [--config_file, configs/accelerate/ddp.yaml].")
    if ("config" in raw) == ("eval" in raw):
        raise ConfigError(f"{where}: set exactly one of config (a recipe config) or eval (what to evaluate).")
    if "eval" in raw:
        if source is None:
            raise ConfigError(f"{where}: an eval stage needs an earlier training stage to evaluate.")
        return Stage(name, "eval", source=source, eval_flags=_eval_flags(raw["eval"], where, source))
    config = Path(raw["config"])
    if not config.is_file():
        raise ConfigError(f"{where}: config: {config}: no such file.")
    recipe = stage_named_in(config)
    runnable = [name for name, stage in STAGES.items() if stage.in_pipeline]
    if recipe not in runnable:
        raise ConfigError(f"{where}: {config} names no recipe ({', '.join(runnable)}) in its first comment line.")
    if not STAGES[recipe].starts_from_previous:
        source = raw.get("from")  # e.g. pretraining starts from scratch unless told otherwise
    return Stage(name, recipe, config, source, [str(arg) for arg in launch_args])


def eval_keys() -> dict[str, evaluation_tasks.EvalTask]:
    """The keys of an eval stage, one per evaluation task, and the task (whose `hfpipe eval` flag each becomes)."""
    return {task.key: task for task in evaluation_tasks.EVAL_TASKS}


def _eval_flags(spec: Any, where: str, source: str | None = None) -> list[str]:
    keys = eval_keys()
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: eval: expected a mapping of {', '.join(keys)} to lists of files or tasks.")
    _check_keys(spec, tuple(keys), f"{where}: eval")
    flags: list[str] = []
    for key, values in spec.items():
        task = keys[key]
        if not task.runs_on(reward_model=False):  # an eval stage evaluates the latest model that generates
            raise ConfigError(
                f"{where}: eval: {key}: needs a reward model, and an eval stage evaluates the latest generating "
                f"model{f' ({source!r})' if source else ''}. Score answers with `hfpipe eval REWARD_RUN {task.flag} "
                "FILE` instead."
            )
        values = [str(value) for value in (values if isinstance(values, list) else [values])]
        # One flag with every value: a repeated flag would keep only its last value.
        flags += [task.flag, ",".join(values)] if task.comma_separated else [task.flag, *values]
    return flags


def plan(stages: list[Stage], start: str | None) -> set[str]:
    """Check every stage config as its recipe would, in order, with each stage's input the output of the stage it
    starts from; fill in output dirs. Returns the stages to rerun (--from and after)."""
    from hfpipe.models.pretrained import planned_model_dirs

    names = [stage.name for stage in stages]
    if start is not None and start not in names:
        raise ConfigError(f"--from: no stage named '{start}'.{did_you_mean(start, names)} Stages: {', '.join(names)}.")
    outputs: dict[str, Path] = {}
    for stage in stages:
        if stage.recipe == "eval":
            stage.output_dir = outputs[stage.source]
            continue
        # Checked as a rerun would be: a finished stage is skipped, not refused. Earlier stages' outputs may not
        # exist yet.
        argv = ["--config", str(stage.config), *_model_flag(stage, outputs), "--overwrite_output_dir", "true"]
        with planned_model_dirs({str(path) for path in outputs.values()}):
            parsed = STAGES[stage.recipe].parse(argv)
        stage.output_dir = Path(parsed.values[0].output_dir)
        outputs[stage.name] = stage.output_dir
    return set(names[names.index(start) :]) if start else set()


def _model_flag(stage: Stage, outputs: dict[str, Path]) -> list[str]:
    return ["--model_name_or_path", str(outputs[stage.source])] if stage.source else []


def stage_command(stage: Stage, stages: list[Stage], rerun: bool) -> list[str]:
    """The command that runs one stage: `accelerate launch` for a recipe, `hfpipe eval` for an evaluation."""
    outputs = {other.name: other.output_dir for other in stages if other.recipe != "eval"}
    bin_dir = Path(sys.executable).parent
    if stage.recipe == "eval":
        results = stage.output_dir / EVAL_RESULTS
        return [
            str(bin_dir / "hfpipe"),
            "eval",
            str(outputs[stage.source]),
            *stage.eval_flags,
            "--output",
            str(results),
        ]
    recipe = STAGES[stage.recipe].recipe
    command = [str(bin_dir / "accelerate"), "launch", *stage.launch_args, str(recipe), "--config", str(stage.config)]
    return command + _model_flag(stage, outputs) + (["--overwrite_output_dir", "true"] if rerun else [])


def stage_done(stage: Stage) -> bool:
    """A training stage is done when its run finished; an eval stage when its results file exists."""
    if stage.recipe == "eval":
        return (stage.output_dir / EVAL_RESULTS).is_file()
    return is_finished(stage.output_dir)


def stage_figures(stage: Stage) -> dict[str, Any]:
    """The numbers the summary shows, from the stage's metrics.json or eval results."""
    if stage.recipe == "eval":
        return json.loads((stage.output_dir / EVAL_RESULTS).read_text()).get("metrics", {})
    return read_metrics(stage.output_dir)


def summary_table(stages: list[Stage], seconds: dict[str, float | None]) -> str:
    """Per stage: how long it took here (or that it was skipped), final train and eval loss, key numbers."""
    lines = [f"{'stage':<12} {'recipe':<9} {'time':>8} {'train loss':>11} {'eval loss':>10}  key numbers", "-" * 96]
    for stage in stages:
        figures = stage_figures(stage)
        spent = seconds.get(stage.name)
        took = "skipped" if spent is None else f"{spent:.0f} s"
        train, evaluated = figures.get("train_loss"), figures.get("eval_loss")
        keys = ", ".join(f"{key} {figures[key]:.3g}" for key in KEY_METRICS if isinstance(figures.get(key), float))
        lines.append(
            f"{stage.name:<12} {stage.recipe:<9} {took:>8} {'' if train is None else f'{train:.4f}':>11} "
            f"{'' if evaluated is None else f'{evaluated:.4f}':>10}  {keys}"
        )
    return "\n".join(lines)


def run_pipeline(path: Path, start: str | None) -> None:
    """Run the pipeline file at `path` (from stage `start` on, when given); raise SystemExit with a failed stage's
    exit code."""
    stages, prompts, tokens = read_pipeline(path)
    rerun = plan(stages, start)
    seconds: dict[str, float | None] = {}
    for stage in stages:
        if seconds and any(spent is not None for spent in seconds.values()):
            rerun.add(stage.name)  # an earlier stage ran again: what was built on its old output is stale
        if stage.name not in rerun and stage_done(stage):
            print(f"=== {stage.name}: finished earlier ({stage.output_dir}); skipped", flush=True)
            seconds[stage.name] = None
            continue
        if stage.recipe == "eval":
            (stage.output_dir / EVAL_RESULTS).unlink(missing_ok=True)
        command = stage_command(stage, stages, stage.name in rerun)
        print(f"=== {stage.name}: {' '.join(command)}", flush=True)
        began = time.perf_counter()
        with Inbox() as inbox:  # the stage's user error comes here, to be printed last
            code = subprocess.call(command, env={**os.environ, **inbox.env})
            user_errors = inbox.take()
        seconds[stage.name] = time.perf_counter() - began
        if code != 0:
            kept = [s.name for s in stages if s.name in seconds and s is not stage]
            # Exit code 2 without a line handed over: the stage printed its error itself, and it stays last.
            if code != USER_ERROR_EXIT_CODE or user_errors:
                print(
                    f"error: pipeline stopped: stage '{stage.name}' failed with exit code {code}; finished stages "
                    f"kept: {', '.join(kept) or 'none'}. Fix it and rerun (finished stages are skipped).",
                    file=sys.stderr,
                )
            for line in user_errors:
                print(line, file=sys.stderr)
            raise SystemExit(code)
    print(f"\n=== summary: {path}\n{summary_table(stages, seconds)}", flush=True)
    generators = [stage for stage in stages if stage.recipe != "eval" and STAGES[stage.recipe].generates]
    if prompts and generators:
        final = generators[-1]
        print(f"\n=== answers of the final model ({final.output_dir}), greedy", flush=True)
        flags = [arg for prompt in prompts for arg in ("--prompt", prompt)]
        generate = [str(Path(sys.executable).parent / "hfpipe"), "generate", str(final.output_dir), *flags]
        subprocess.call([*generate, "--max-new-tokens", str(tokens)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline tool's flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("pipeline", type=Path, help="a pipeline YAML file (see configs/quickstart/pipeline.yaml)")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every stage after it")


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe pipeline`."""
    run_pipeline(args.pipeline, args.start)
