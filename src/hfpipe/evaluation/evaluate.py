"""Evaluate a model: perplexity on text files, multiple-choice accuracy by log-likelihood (HellaSwag-format JSONL),
preference accuracy on prompt/chosen/rejected JSONL, and EleutherAI lm-eval-harness tasks when lm-eval is installed.

MODEL is a run's output dir, an adapter dir (loaded onto its base), a .gguf file or shipped model, or a Hub id;
without it, the latest finished run under outputs/. Every input file is checked before the model loads. Results
are printed as a table and written as JSON beside the model (a new timestamped file each time) or to --output.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hfpipe.errors import ConfigError, DataError, did_you_mean
from hfpipe.evaluation import scoring
from hfpipe.evaluation.scoring import (
    CHOICE_EXAMPLE,
    PREFERENCE_EXAMPLE,
    ChoiceRow,
    PreferenceRow,
    choice_row,
    preference_row,
)
from hfpipe.rundir import model_or_latest_run

TEXT_SUFFIXES = (".txt", ".jsonl")
LM_EVAL_INSTALL = "pip install lm-eval"
# How the command line names the EvalArguments fields in its messages.
FLAGS = {
    "eval_text_files": "--text",
    "eval_choice_files": "--choices",
    "eval_preference_files": "--preferences",
    "eval_lm_tasks": "--lm-eval",
    "eval_tasks_batch_size": "--batch-size",
    "eval_max_length": "--max-length",
    "eval_stride": "--stride",
}


@dataclass
class EvalArguments:
    """What to evaluate a model on, after training or with `hfpipe eval`."""

    eval_text_files: list[str] | None = field(
        default=None,
        metadata={"help": "Perplexity on these .txt (one document per file) or .jsonl ('text' field) files or globs."},
    )
    eval_choice_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Multiple-choice accuracy on these HellaSwag-format .jsonl files: rows "
            f"{CHOICE_EXAMPLE} (or HellaSwag's ctx/endings/label)."
        },
    )
    eval_preference_files: list[str] | None = field(
        default=None,
        metadata={"help": f"Preference accuracy on these .jsonl files: rows {PREFERENCE_EXAMPLE} (or message lists)."},
    )
    eval_lm_tasks: list[str] | None = field(
        default=None, metadata={"help": "lm-eval-harness task names (needs `pip install lm-eval` and its task data)."}
    )
    eval_tasks_batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass when evaluating."})
    eval_max_length: int | None = field(
        default=None, metadata={"help": "Tokens per window or scored sequence. Default: the model's context length."}
    )
    eval_stride: int | None = field(
        default=None,
        metadata={"help": "Perplexity with a sliding window this many tokens apart. Default: non-overlapping windows."},
    )


@dataclass
class TaskResult:
    """The metrics of one evaluation task and how many rows, tokens or samples they cover."""

    task: str
    metrics: dict[str, float]
    n: int
    unit: str


def resolve_inputs(patterns: list[str], key: str, where: str, suffixes: tuple[str, ...]) -> list[str]:
    """Expand paths and globs; each must match at least one file, and every file must end with one of `suffixes`."""
    files = []
    for pattern in patterns:
        matches = sorted(
            path for path in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(path)
        )
        if not matches:
            raise DataError(f"{where}: {key}: no file matches '{pattern}'. Check the path (relative to {os.getcwd()}).")
        files.extend(matches)
    for file in files:
        if not file.lower().endswith(suffixes):
            raise DataError(f"{where}: {key}: {file}: expected a {' or '.join(suffixes)} file.")
    return files


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The non-blank lines of a JSONL file as (line number, object); a bad line is a one-line DataError."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {number} is not UTF-8. Re-save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}: line {number} is not valid JSON ({error.msg}). Fix or remove it.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is not a JSON object. Write one {{...}} object per line.")
            rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows. Remove it from the list or add rows.")
    return rows


def read_texts(path: str) -> list[str]:
    """The documents of a .txt file (the whole file) or of a .jsonl file (each row's 'text')."""
    if path.lower().endswith(".txt"):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 (byte {error.start}). Re-save the file as UTF-8.") from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty. Remove it from the list or add text to it.")
        return [text]
    texts = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{path}: line {number}: 'text' is missing or empty. Give each row a non-empty 'text'.")
        texts.append(row["text"])
    return texts


def read_rows(path: str, parse: Any) -> list[Any]:
    """Parse every row of a JSONL file with `parse` (a row or a problem); the first problem is a DataError."""
    rows = []
    for number, raw in read_jsonl(path):
        row = parse(raw)
        if isinstance(row, str):
            raise DataError(f"{path}: line {number}: {row}. Fix the row.")
        row.origin = f"{path}: line {number}"
        rows.append(row)
    return rows


@dataclass
class EvalInputs:
    """The checked contents of every input file."""

    texts: list[str] = field(default_factory=list)
    choices: list[ChoiceRow] = field(default_factory=list)
    preferences: list[PreferenceRow] = field(default_factory=list)


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
    inputs = EvalInputs()
    key = "eval_text_files"
    for path in resolve_inputs(args.eval_text_files or [], _label(labels, key), where, TEXT_SUFFIXES):
        inputs.texts.extend(read_texts(path))
    key = "eval_choice_files"
    for path in resolve_inputs(args.eval_choice_files or [], _label(labels, key), where, (".jsonl",)):
        inputs.choices.extend(read_rows(path, choice_row))
    key = "eval_preference_files"
    for path in resolve_inputs(args.eval_preference_files or [], _label(labels, key), where, (".jsonl",)):
        inputs.preferences.extend(read_rows(path, preference_row))
    if args.eval_lm_tasks:
        check_lm_eval(args.eval_lm_tasks, where, _label(labels, "eval_lm_tasks"))
    return inputs


def check_stride(stride: int, length: int | None, key: str) -> None:
    """A sliding window moves by at least 1 token and at most its length (more would skip tokens)."""
    if stride < 1 or (length is not None and stride > length):
        raise ConfigError(f"{key}: {stride} must be between 1 and the window length ({length or 'the context'}).")


def check_eval_args(args: EvalArguments, where: str, labels: Mapping[str, str] | None = None) -> None:
    """Stop with one line naming the file and row when any setting or input file cannot be used; load no model."""
    load_inputs(args, where, labels)


def check_lm_eval(tasks: list[str], where: str, key: str) -> None:
    """lm-eval must be importable and know each task."""
    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except ValueError:  # a module in sys.modules without a spec
        found = False
    if not found:
        raise ConfigError(
            f"{where}: {key}: the lm-eval package (EleutherAI's LM Evaluation Harness) is not installed. Install it "
            f"with `{LM_EVAL_INSTALL}`; its tasks download their data from the Hugging Face Hub on first use."
        )
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    for task in tasks:
        if task not in known:
            raise ConfigError(f"{where}: {key}: lm-eval has no task '{task}'.{did_you_mean(task, known)}")


def window_length(model: Any, max_length: int | None, key: str) -> int:
    """The tokens per scored sequence: `max_length`, or the model's context when not set."""
    from hfpipe.tools.generate import context_length

    context = context_length(model)
    if max_length is None:
        if context is None:
            raise ConfigError(f"{key}: the model's config gives no context length; set it.")
        return context
    if context is not None and max_length > context:
        raise ConfigError(f"{key}: {max_length} exceeds the model's context of {context} tokens.")
    return max_length


def _note_cut(cut: int, total: int, what: str, length: int) -> None:
    if cut:
        print(f"note: {cut} of {total} {what} exceed {length} tokens and were cut on the left to fit.")


def evaluate_all(
    model: Any,
    tokenizer: Any,
    args: EvalArguments,
    inputs: EvalInputs | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[TaskResult]:
    """Run every evaluation `args` asks for on a loaded model; `inputs` are the files as `load_inputs` read them."""
    inputs = inputs or load_inputs(args, "eval", labels)
    length = window_length(model, args.eval_max_length, _label(labels, "eval_max_length"))
    stride = args.eval_stride or length
    check_stride(stride, length, _label(labels, "eval_stride"))
    for row in inputs.preferences:
        fields = row.fields
        if not tokenizer.chat_template and (row.row_format == "implicit_prompt" or isinstance(fields["chosen"], list)):
            raise DataError(f"{row.origin}: message lists need a chat template and the tokenizer has none.")
    batch, results = args.eval_tasks_batch_size, []
    was_training = model.training
    model.eval()
    try:
        if inputs.texts:
            metrics, tokens = scoring.text_perplexity(model, tokenizer, inputs.texts, batch, length, stride)
            results.append(TaskResult("text", metrics, tokens, "tokens"))
        if inputs.choices:
            logprobs, cut = scoring.choice_logprobs(model, tokenizer, inputs.choices, batch, length)
            _note_cut(cut, sum(len(row.endings) for row in inputs.choices), "context + ending pairs", length)
            metrics = scoring.choice_metrics(inputs.choices, logprobs)
            results.append(TaskResult("mc", metrics, len(inputs.choices), "rows"))
        if inputs.preferences:
            scores, cut = scoring.preference_logprobs(model, tokenizer, inputs.preferences, batch, length)
            _note_cut(cut, 2 * len(inputs.preferences), "prompt + response pairs", length)
            metrics = scoring.preference_metrics(scores)
            results.append(TaskResult("pref", metrics, len(inputs.preferences), "rows"))
        if args.eval_lm_tasks:
            key = _label(labels, "eval_lm_tasks")
            results.extend(run_lm_eval(model, tokenizer, args.eval_lm_tasks, batch, key))
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
    """A recipe config's `eval_*` keys (merged values, before any dataclass is built): check every input file."""
    names = [item.name for item in dataclasses.fields(EvalArguments)]
    check_eval_args(EvalArguments(**{name: values[name] for name in names if name in values}), where)


def evaluate_after_training(trainer: Any, tokenizer: Any, args: EvalArguments) -> dict[str, float]:
    """Run a recipe config's `eval_*` tasks on the trained model (main process only), print the table and return the
    flat metrics for metrics.json; nothing when the config sets no task."""
    tasks = (args.eval_text_files, args.eval_choice_files, args.eval_preference_files, args.eval_lm_tasks)
    if not any(tasks) or not trainer.is_world_process_zero():
        return {}
    results = evaluate_all(trainer.model, tokenizer, args)
    print(format_table(results))
    return flat_metrics(results)


def run_evaluations(model: Any, tokenizer: Any, args: EvalArguments) -> dict[str, float]:
    """Evaluate a model in memory (e.g. at the end of training) and return flat metric names and values."""
    return flat_metrics(evaluate_all(model, tokenizer, args))


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], batch_size: int, key: str) -> list[TaskResult]:
    """Run lm-eval-harness tasks on the loaded model through its HFLM wrapper."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(model=harness_model, tasks=list(tasks))
    except OSError as error:  # no network, offline mode, or a task dataset missing from the cache
        offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(name, "0") != "0"]
        hint = f" ({' and '.join(offline)} set: unset to download)" if offline else ""
        raise DataError(
            f"{key} {','.join(tasks)}: lm-eval could not load the task data ({str(error).splitlines()[0]}). Its tasks "
            f"download their datasets from the Hugging Face Hub: run once with network access{hint}, and later runs "
            "read them from the datasets cache."
        ) from None
    return lm_eval_results(output)


def lm_eval_results(output: Mapping[str, Any]) -> list[TaskResult]:
    """lm-eval's results per task: metrics named without the default filter ('acc,none' -> 'acc'), no stderrs."""
    results = []
    for task, values in output["results"].items():
        metrics = {
            name.removesuffix(",none").replace(",", "_"): float(value)
            for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name
        }
        samples = output.get("n-samples", {}).get(task, {}).get("effective", 0)
        results.append(TaskResult(f"lm_eval_{task}", metrics, int(samples), "samples"))
    return results


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
    return directory / f"eval_results-{now:%Y%m%d-%H%M%S}.json"


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


def _help(name: str) -> str:
    return EvalArguments.__dataclass_fields__[name].metadata["help"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe eval`."""
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="model dir, adapter dir, .gguf, shipped model or Hub id. Default: the latest finished run in outputs/",
    )
    for flag, dest in (("--text", "eval_text_files"), ("--choices", "eval_choice_files")):
        parser.add_argument(flag, dest=dest, nargs="+", metavar="FILE", help=_help(dest))
    parser.add_argument(
        "--preferences", dest="eval_preference_files", nargs="+", metavar="FILE", help=_help("eval_preference_files")
    )
    parser.add_argument(
        "--lm-eval",
        dest="eval_lm_tasks",
        metavar="TASKS",
        type=lambda text: [t for t in text.split(",") if t],
        help="comma-separated " + _help("eval_lm_tasks"),
    )
    for flag, dest in (
        ("--batch-size", "eval_tasks_batch_size"),
        ("--max-length", "eval_max_length"),
        ("--stride", "eval_stride"),
    ):
        default = EvalArguments.__dataclass_fields__[dest].default
        parser.add_argument(flag, dest=dest, type=int, default=default, metavar="N", help=_help(dest))
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="results JSON file (must not exist). Default: a new eval_results-TIME.json in the model dir",
    )
    parser.add_argument("--dtype", help="load the model in this dtype (float32, bfloat16, ...). Default: as saved")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... Default: a GPU when present")


def run(args: argparse.Namespace) -> None:
    """Check every input, load the model, evaluate, print the table and write the results file."""
    from dataclasses import fields

    from hfpipe.models.trained import load_for_inference

    eval_args = EvalArguments(**{item.name: getattr(args, item.name) for item in fields(EvalArguments)})
    tasks = (eval_args.eval_text_files, eval_args.eval_choice_files, eval_args.eval_preference_files)
    if not any(tasks) and not eval_args.eval_lm_tasks:
        raise ConfigError("nothing to evaluate: give --text, --choices, --preferences or --lm-eval.")
    inputs = load_inputs(eval_args, "command line", FLAGS)
    check_output(args.output)
    name, picked = model_or_latest_run(args.model)
    if picked:
        print(f"Evaluating {picked}: {name}")
    loaded = load_for_inference(name, args.dtype, args.device)
    results = evaluate_all(loaded.model, loaded.tokenizer, eval_args, inputs, FLAGS)
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
