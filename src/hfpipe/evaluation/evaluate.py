"""Evaluate a model: perplexity on text files, multiple-choice accuracy by log-likelihood (HellaSwag-format JSONL),
preference accuracy on prompt/chosen/rejected JSONL, and EleutherAI lm-eval-harness tasks when lm-eval is installed.
A reward model run (recipes/reward.py, full or LoRA) scores instead: the rewards of a file of answers (--answers),
and how often it scores a pair's chosen answer above the rejected one (--preferences).

MODEL is a run's output dir, an adapter dir (loaded onto its base), a .gguf file or shipped model, or a Hub id;
without it, the latest finished run under outputs/. Every input file, and whether the model can do each task, is
checked before the model loads. Results are printed as a table and written as JSON beside the model (a new
timestamped file each time) or to --output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from hfpipe.errors import ConfigError
from hfpipe.evaluation import tasks
from hfpipe.evaluation.inputs import read_jsonl as read_jsonl
from hfpipe.evaluation.tasks import EvalTask, ScoreSettings, TaskResult
from hfpipe.evaluation.tasks import lm_eval_results as lm_eval_results
from hfpipe.rundir import eval_results_name, model_or_latest_run, stage_of
from hfpipe.stages import STAGES, Stage
from hfpipe.tools.model_flags import add_model_argument


class Setting(NamedTuple):
    """A setting every task shares: its EvalArguments field, `hfpipe eval` flag, type, default and help."""

    name: str
    flag: str
    type: Any
    default: int | None
    help: str


SHARED_SETTINGS = (
    Setting("eval_tasks_batch_size", "--batch-size", int, 8, "Sequences per forward pass when evaluating."),
    Setting(
        "eval_max_length",
        "--max-length",
        int | None,
        None,
        "Tokens per window or scored sequence. Default: the model's context length.",
    ),
    Setting(
        "eval_stride",
        "--stride",
        int | None,
        None,
        "Perplexity with a sliding window this many tokens apart. Default: non-overlapping windows.",
    ),
)


def eval_arguments_class(task_list: Sequence[EvalTask]) -> type:
    """The EvalArguments dataclass: a list field per task (the eval_* keys of recipe configs), then the shared
    settings."""
    specs = [
        (task.setting, list[str] | None, dataclasses.field(default=None, metadata={"help": task.help}))
        for task in task_list
    ]
    specs += [
        (setting.name, setting.type, dataclasses.field(default=setting.default, metadata={"help": setting.help}))
        for setting in SHARED_SETTINGS
    ]
    doc = "What to evaluate a model on, after training or with `hfpipe eval`."
    return dataclasses.make_dataclass("EvalArguments", specs, namespace={"__module__": __name__, "__doc__": doc})


EvalArguments = eval_arguments_class(tasks.EVAL_TASKS)

# Task name -> its checked rows, for the tasks asked for.
EvalInputs = dict[str, list[Any]]


def command_line_flags() -> dict[str, str]:
    """How the command line names the EvalArguments fields in its messages."""
    return {task.setting: task.flag for task in tasks.EVAL_TASKS} | {s.name: s.flag for s in SHARED_SETTINGS}


def asked_for(args: EvalArguments) -> list[EvalTask]:
    """The tasks `args` gives inputs for, in the order of the task list."""
    return [task for task in tasks.EVAL_TASKS if getattr(args, task.setting)]


def _label(labels: Mapping[str, str] | None, key: str) -> str:
    return (labels or {}).get(key, key)


def load_inputs(args: EvalArguments, where: str, labels: Mapping[str, str] | None = None) -> EvalInputs:
    """Check the settings and read and check every input file; load no model. `labels` names the settings in
    messages (the command line passes its flags)."""
    if args.eval_tasks_batch_size < 1:
        raise ConfigError(f"{where}: {_label(labels, 'eval_tasks_batch_size')}: must be at least 1.")
    if args.eval_max_length is not None and args.eval_max_length < 2:
        raise ConfigError(f"{where}: {_label(labels, 'eval_max_length')}: must be at least 2 tokens.")
    if args.eval_stride is not None:
        check_stride(args.eval_stride, args.eval_max_length, f"{where}: {_label(labels, 'eval_stride')}")
    return {
        task.name: task.read(getattr(args, task.setting), where, _label(labels, task.setting))
        for task in asked_for(args)
    }


def check_stride(stride: int, length: int | None, key: str) -> None:
    """A sliding window moves by at least 1 token and at most its length (more would skip tokens)."""
    if stride < 1 or (length is not None and stride > length):
        raise ConfigError(f"{key}: {stride} must be between 1 and the window length ({length or 'the context'}).")


def check_eval_args(args: EvalArguments, where: str, labels: Mapping[str, str] | None = None) -> None:
    """Stop with one line naming the file and row when any setting or input file cannot be used; load no model."""
    load_inputs(args, where, labels)


def is_reward_run(name: str) -> bool:
    """Whether `name` is the output dir of a stage that scores rather than generates (the registry's `generates`),
    as the run recorded it; decided before anything loads."""
    path = Path(name).expanduser()
    stage = STAGES.get(stage_of(path) or "") if path.is_dir() else None
    return stage is not None and not stage.generates


def is_reward_model(model: Any) -> bool:
    """Whether a loaded model (or a PEFT model around one) is a sequence classifier: a reward model's score head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")


def check_model_kind(
    args: EvalArguments, reward_model: bool, where: str, subject: str, labels: Mapping[str, str] | None = None
) -> None:
    """Every task asked for must run on the kind of model evaluated (a reward model or a causal LM); `subject` says
    what the model is ("outputs/x is a reward model run"). One line before any model loads."""
    for task in asked_for(args):
        if task.runs_on(reward_model):
            continue
        label = _label(labels, task.setting)
        if reward_model:
            usable = _either(_label(labels, other.setting) for other in tasks.EVAL_TASKS if other.runs_on(True))
            raise ConfigError(
                f"{where}: {label}: needs a causal LM, and {subject}, which scores answers rather than generating "
                f"them (evaluate it with {usable})."
            )
        scorers = _either(f"recipes/{stage.name}.py" for stage in STAGES.values() if not stage.generates)
        raise ConfigError(
            f"{where}: {label}: needs a reward model run (a {scorers} output), and {subject}. Run it on one: "
            f"`hfpipe eval REWARD_RUN {task.flag} FILE`."
        )


def config_stage(values: Mapping[str, Any]) -> Stage | None:
    """The registered stage whose config `values` are: the one whose config module (already imported: it is being
    parsed) declares exactly these keys in its ARGUMENTS; None when no stage's keys match (a bare EvalArguments)."""
    keys = set(values)
    for stage in STAGES.values():
        arguments = getattr(sys.modules.get(stage.config_module), "ARGUMENTS", None)
        if arguments and keys == {item.name for cls in arguments for item in dataclasses.fields(cls) if item.init}:
            return stage
    return None


def window_length(model: Any, max_length: int | None, key: str) -> int:
    """The tokens per scored sequence: `max_length`, or the model's context when not set."""
    from hfpipe.tools.prompts import context_length

    context = context_length(model)
    if max_length is None:
        if context is None:
            raise ConfigError(f"{key}: the model's config gives no context length; set it.")
        return context
    if context is not None and max_length > context:
        raise ConfigError(f"{key}: {max_length} exceeds the model's context of {context} tokens.")
    return max_length


def evaluate_all(
    model: Any,
    tokenizer: Any,
    args: EvalArguments,
    inputs: EvalInputs | None = None,
    labels: Mapping[str, str] | None = None,
    reward_model: bool | None = None,
) -> list[TaskResult]:
    """Run every evaluation `args` asks for on a loaded model; `inputs` are the files as `load_inputs` read them.
    `reward_model`: whether the model is a reward model (default: a sequence classifier is one)."""
    reward_model = is_reward_model(model) if reward_model is None else reward_model
    subject = f"the model is a {'reward model' if reward_model else 'causal LM'}"
    check_model_kind(args, reward_model, "eval", subject, labels)
    inputs = load_inputs(args, "eval", labels) if inputs is None else inputs
    length = window_length(model, args.eval_max_length, _label(labels, "eval_max_length"))
    stride = args.eval_stride or length
    check_stride(stride, length, _label(labels, "eval_stride"))
    wanted = [(task, inputs[task.name]) for task in tasks.EVAL_TASKS if inputs.get(task.name)]
    for task, rows in wanted:
        if task.check_tokenizer is not None:
            task.check_tokenizer(tokenizer, rows)
    results = []
    was_training = model.training
    model.eval()
    try:
        for task, rows in wanted:
            settings = ScoreSettings(args.eval_tasks_batch_size, length, stride, _label(labels, task.setting))
            results.extend(task.evaluate(model, tokenizer, rows, settings, reward_model))
    finally:
        model.train(was_training)
    return results


def flat_metrics(results: list[TaskResult]) -> dict[str, float]:
    """One flat mapping, task_metric -> value (text_perplexity, mc_acc_norm, pref_accuracy, ...), with each task's
    count as task_unit (text_tokens, mc_rows, pref_rows, lm_eval_TASK_samples)."""
    flat: dict[str, float] = {}
    for result in results:
        flat.update({f"{result.task}_{metric}": value for metric, value in result.metrics.items()})
        flat[f"{result.task}_{result.unit}"] = result.n
    return flat


def check_config_evaluations(values: Mapping[str, Any], where: str) -> None:
    """A recipe config's `eval_*` keys (merged values, before any dataclass is built): each task must run on the
    model the stage trains (a reward stage's is a reward model, every other stage's a causal LM); check every input
    file."""
    names = [item.name for item in dataclasses.fields(EvalArguments)]
    args = EvalArguments(**{name: values[name] for name in names if name in values})
    stage = config_stage(values)
    if stage is not None:
        kind = "a causal LM" if stage.generates else "a reward model"
        check_model_kind(args, not stage.generates, where, f"recipes/{stage.name}.py trains {kind}")
    check_eval_args(args, where)


def evaluate_after_training(trainer: Any, tokenizer: Any, args: EvalArguments) -> dict[str, float]:
    """Run a recipe config's `eval_*` tasks on the trained model (main process only), print the table and return the
    flat metrics for metrics.json; nothing when the config sets no task."""
    if not asked_for(args) or not trainer.is_world_process_zero():
        return {}
    results = evaluate_all(trainer.model, tokenizer, args)
    print(format_table(results))
    return flat_metrics(results)


def run_evaluations(model: Any, tokenizer: Any, args: EvalArguments) -> dict[str, float]:
    """Evaluate a model in memory (e.g. at the end of training) and return flat metric names and values."""
    return flat_metrics(evaluate_all(model, tokenizer, args))


def _either(flags: Any) -> str:
    flags = list(flags)
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}"


def format_table(results: list[TaskResult]) -> str:
    """A plain-text table: task, metric, value, n."""
    lines = [f"{'task':<24} {'metric':<20} {'value':>12} {'n':>16}"]
    for result in results:
        for metric, value in result.metrics.items():
            lines.append(f"{result.task:<24} {metric:<20} {value:>12.4f} {f'{result.n} {result.unit}':>16}")
    return "\n".join(lines)


def default_output(model_name: str, now: datetime) -> Path:
    """Beside the model when it is a local dir (outputs/eval/NAME/ otherwise), named by the time of the run."""
    model_path = Path(model_name).expanduser()
    directory = model_path if model_path.is_dir() else Path("outputs") / "eval" / model_path.name.removesuffix(".gguf")
    return directory / eval_results_name(now)


def check_output(output: Path | None) -> None:
    """An explicit results file must not exist yet: results are never overwritten."""
    if output is not None and output.exists():
        raise ConfigError(f"{output}: already exists and results are never overwritten; pick another --output.")


def write_results(payload: dict[str, Any], output: Path | None, model_name: str) -> Path:
    """Write results as JSON to a new file (`output`, or a timestamped name beside the model); return its path."""
    path = output or default_output(model_name, datetime.now())
    candidate, attempt = path, 1
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with open(candidate, "x", encoding="utf-8") as handle:  # "x": never replace an existing file
                json.dump(payload, handle, indent=2)
            return candidate
        except FileExistsError:  # made since the check before loading the model, or in the same second
            attempt += 1
            candidate = path.with_name(f"{path.stem}-{attempt}{path.suffix}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe eval`."""
    add_model_argument(parser, optional=True)
    for task in tasks.EVAL_TASKS:
        if task.comma_separated:
            parser.add_argument(
                task.flag,
                dest=task.setting,
                metavar=task.metavar,
                type=lambda text: [value for value in text.split(",") if value],
                help="comma-separated " + task.help,
            )
        else:
            parser.add_argument(task.flag, dest=task.setting, nargs="+", metavar=task.metavar, help=task.help)
    for setting in SHARED_SETTINGS:
        parser.add_argument(
            setting.flag, dest=setting.name, type=int, default=setting.default, metavar="N", help=setting.help
        )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="results JSON file (must not exist). Default: a new eval_results-TIME.json in the model dir",
    )
    parser.add_argument("--dtype", help="load the model in this dtype (float32, bfloat16, ...). Default: as saved")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... Default: a GPU when present")


def run(args: argparse.Namespace) -> None:
    """Check every input and that the model can do each task, load the model (a reward model run as a scorer, any
    other as a causal LM), evaluate, print the table and write the results file."""
    from hfpipe.models.trained import load_for_inference, load_scorer_for_inference

    eval_args = EvalArguments(**{item.name: getattr(args, item.name) for item in dataclasses.fields(EvalArguments)})
    if not asked_for(eval_args):
        raise ConfigError(
            f"nothing to evaluate: give {_either(task.flag for task in tasks.EVAL_TASKS if task.runs_on(False))}. "
            f"For a reward model run: {_either(task.flag for task in tasks.EVAL_TASKS if task.runs_on(True))}."
        )
    labels = command_line_flags()
    name, picked = model_or_latest_run(args.model)
    reward_model = is_reward_run(name)
    subject = f"{name} is {'a reward model run' if reward_model else 'a causal LM'}"
    check_model_kind(eval_args, reward_model, "command line", subject, labels)
    inputs = load_inputs(eval_args, "command line", labels)
    check_output(args.output)
    if picked:
        print(f"Evaluating {picked}: {name}")
    load = load_scorer_for_inference if reward_model else load_for_inference
    loaded = load(name, args.dtype, args.device)
    results = evaluate_all(loaded.model, loaded.tokenizer, eval_args, inputs, labels, reward_model)
    print(format_table(results))
    payload = {
        "model": name,
        "base": loaded.base,
        "created": datetime.now().isoformat(timespec="seconds"),
        "settings": asdict(eval_args),
        "metrics": flat_metrics(results),
        "tasks": [asdict(result) for result in results],
    }
    print(f"Results written to {write_results(payload, args.output, name)}")
