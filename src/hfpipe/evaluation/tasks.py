"""The evaluation tasks, each described once: its setting, `hfpipe eval` flag and pipeline key, how its inputs are
read and checked, and how it is scored on a causal LM, on a reward model (a scorer run), or both. `EVAL_TASKS` is
the one list: the eval_* keys of recipe configs (EvalArguments), the flags of `hfpipe eval`, the keys of a
pipeline's eval stage and the order of results follow it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from hfpipe.errors import ConfigError, DataError, did_you_mean
from hfpipe.evaluation import reward_scoring, scoring
from hfpipe.evaluation.inputs import FileReader, read_rows, read_texts
from hfpipe.evaluation.reward_scoring import ANSWER_EXAMPLE, AnswerRow
from hfpipe.evaluation.scoring import CHOICE_EXAMPLE, PREFERENCE_EXAMPLE, ChoiceRow, PreferenceRow

LM_EVAL_INSTALL = "pip install lm-eval"


@dataclass
class TaskResult:
    """The metrics of one evaluation task and how many rows, tokens or samples they cover."""

    task: str
    metrics: dict[str, float]
    n: int
    unit: str


@dataclass(frozen=True)
class Score:
    """What a scorer measured: `metrics` over `n` rows, tokens or samples (`unit`). `part` tells apart the results
    of a task that has several (lm-eval: one per harness task); empty for a task's only result."""

    metrics: dict[str, float]
    n: int
    unit: str
    part: str = ""


@dataclass(frozen=True)
class ScoreSettings:
    """What every scorer is given besides the model, tokenizer and rows."""

    batch_size: int
    max_length: int
    stride: int
    key: str  # how messages name the task's setting: its flag on the command line, its config key in a recipe


# (values of the task's setting, where, key) -> the checked rows; raises before any model loads.
Reader = Callable[[list[str], str, str], list[Any]]
# (model, tokenizer, rows, settings) -> the scores.
Scorer = Callable[[Any, Any, list[Any], ScoreSettings], list[Score]]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: what names it everywhere, how its inputs are read and how it is scored."""

    name: str  # its results and the prefix of its metrics: text_perplexity, mc_rows
    setting: str  # its EvalArguments field, the recipe config key
    flag: str  # its `hfpipe eval` flag
    key: str  # its key in a pipeline's eval stage
    help: str
    read: Reader
    score: Scorer | None  # on a causal LM; None: the task needs a reward model
    check_tokenizer: Callable[[Any, list[Any]], None] | None = None  # (tokenizer, rows), before any task is scored
    metavar: str = "FILE"
    comma_separated: bool = False  # the flag takes one comma-separated value rather than several
    score_with_reward: Scorer | None = None  # on a reward model (a stage that does not generate); None: it cannot

    def runs_on(self, reward_model: bool) -> bool:
        """Whether the task can score a reward model (`reward_model`) or a causal LM."""
        return (self.score_with_reward if reward_model else self.score) is not None

    def evaluate(
        self, model: Any, tokenizer: Any, rows: list[Any], settings: ScoreSettings, reward_model: bool = False
    ) -> list[TaskResult]:
        """Score `rows` on the loaded model (a reward model when `reward_model`); the results are named after the
        task."""
        score = self.score_with_reward if reward_model else self.score
        if score is None:
            raise ConfigError(
                f"{settings.key}: this task cannot score a {'reward model' if reward_model else 'causal LM'}."
            )
        return self.results(score(model, tokenizer, rows, settings))

    def results(self, scores: list[Score]) -> list[TaskResult]:
        """Scores as results named after the task (and their part: lm_eval_hellaswag)."""
        return [
            TaskResult(f"{self.name}_{score.part}" if score.part else self.name, score.metrics, score.n, score.unit)
            for score in scores
        ]


def _note_cut(cut: int, total: int, what: str, length: int) -> None:
    if cut:
        print(f"note: {cut} of {total} {what} exceed {length} tokens and were cut on the left to fit.")


def score_text(model: Any, tokenizer: Any, texts: list[str], settings: ScoreSettings) -> list[Score]:
    """Perplexity of the documents, concatenated, in windows of `max_length` tokens `stride` apart."""
    metrics, tokens = scoring.text_perplexity(
        model, tokenizer, texts, settings.batch_size, settings.max_length, settings.stride
    )
    return [Score(metrics, tokens, "tokens")]


TEXT = EvalTask(
    name="text",
    setting="eval_text_files",
    flag="--text",
    key="text",
    help="Perplexity on these .txt (one document per file) or .jsonl ('text' field) files or globs.",
    read=FileReader((".txt", ".jsonl"), read_texts),
    score=score_text,
)


def score_choices(model: Any, tokenizer: Any, rows: list[ChoiceRow], settings: ScoreSettings) -> list[Score]:
    """Accuracy of picking the labelled ending by summed log-prob (acc) and by log-prob per character (acc_norm)."""
    logprobs, cut = scoring.choice_logprobs(model, tokenizer, rows, settings.batch_size, settings.max_length)
    _note_cut(cut, sum(len(row.endings) for row in rows), "context + ending pairs", settings.max_length)
    return [Score(scoring.choice_metrics(rows, logprobs), len(rows), "rows")]


CHOICES = EvalTask(
    name="mc",
    setting="eval_choice_files",
    flag="--choices",
    key="choices",
    help="Multiple-choice accuracy on these HellaSwag-format .jsonl files: rows "
    f"{CHOICE_EXAMPLE} (or HellaSwag's ctx/endings/label).",
    read=FileReader((".jsonl",), partial(read_rows, parse=scoring.choice_row)),
    score=score_choices,
)


def check_preference_tokenizer(tokenizer: Any, rows: list[PreferenceRow]) -> None:
    """Rows written as message lists are rendered with the chat template, so the tokenizer must have one."""
    for row in rows:
        fields = row.fields
        if not tokenizer.chat_template and (row.row_format == "implicit_prompt" or isinstance(fields["chosen"], list)):
            raise DataError(f"{row.origin}: message lists need a chat template and the tokenizer has none.")


def score_preferences(model: Any, tokenizer: Any, rows: list[PreferenceRow], settings: ScoreSettings) -> list[Score]:
    """How often the chosen response is likelier than the rejected one, rendered as recipes/dpo.py trains."""
    scores, cut = scoring.preference_logprobs(model, tokenizer, rows, settings.batch_size, settings.max_length)
    _note_cut(cut, 2 * len(rows), "prompt + response pairs", settings.max_length)
    return [Score(scoring.preference_metrics(scores), len(rows), "rows")]


def score_preferences_with_reward(
    model: Any, tokenizer: Any, rows: list[PreferenceRow], settings: ScoreSettings
) -> list[Score]:
    """How often a reward model scores the chosen answer above the rejected one, and the mean margin, rendered as
    recipes/reward.py trains."""
    metrics = reward_scoring.preference_pair_metrics(model, tokenizer, rows, settings.max_length)
    return [Score(metrics, len(rows), "rows")]


PREFERENCES = EvalTask(
    name="pref",
    setting="eval_preference_files",
    flag="--preferences",
    key="preferences",
    help=f"Preference accuracy on these .jsonl files: rows {PREFERENCE_EXAMPLE} (or message lists). On a reward "
    "model run: the share of pairs whose chosen answer scores higher, and the mean margin.",
    read=FileReader((".jsonl",), partial(read_rows, parse=scoring.preference_row)),
    score=score_preferences,
    check_tokenizer=check_preference_tokenizer,
    score_with_reward=score_preferences_with_reward,
)


def check_lm_eval(tasks: list[str], where: str, key: str) -> list[str]:
    """lm-eval must be importable and know each task; the task names are this task's rows."""
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
    return list(tasks)


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], settings: ScoreSettings) -> list[Score]:
    """Run lm-eval-harness tasks on the loaded model through its HFLM wrapper."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    try:
        output = simple_evaluate(model=harness_model, tasks=list(tasks))
    except OSError as error:  # no network, offline mode, or a task dataset missing from the cache
        offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(name, "0") != "0"]
        hint = f" ({' and '.join(offline)} set: unset to download)" if offline else ""
        raise DataError(
            f"{settings.key} {','.join(tasks)}: lm-eval could not load the task data ({str(error).splitlines()[0]}). "
            f"Its tasks download their datasets from the Hugging Face Hub: run once with network access{hint}, and "
            "later runs read them from the datasets cache."
        ) from None
    return lm_eval_scores(output)


def lm_eval_scores(output: Mapping[str, Any]) -> list[Score]:
    """lm-eval's results per task: metrics named without the default filter ('acc,none' -> 'acc'), no stderrs."""
    scores = []
    for task, values in output["results"].items():
        metrics = {
            name.removesuffix(",none").replace(",", "_"): float(value)
            for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name
        }
        samples = output.get("n-samples", {}).get(task, {}).get("effective", 0)
        scores.append(Score(metrics, int(samples), "samples", task))
    return scores


LM_EVAL = EvalTask(
    name="lm_eval",
    setting="eval_lm_tasks",
    flag="--lm-eval",
    key="lm_eval",
    help=f"lm-eval-harness task names (needs `{LM_EVAL_INSTALL}` and its task data).",
    read=check_lm_eval,
    score=run_lm_eval,
    metavar="TASKS",
    comma_separated=True,
)


def lm_eval_results(output: Mapping[str, Any]) -> list[TaskResult]:
    """lm-eval's output as results, one per harness task (lm_eval_hellaswag, ...)."""
    return LM_EVAL.results(lm_eval_scores(output))


def score_answers(model: Any, tokenizer: Any, rows: list[AnswerRow], settings: ScoreSettings) -> list[Score]:
    """The reward model's mean, std, min and max reward over the answers, rendered as recipes/reward.py trains."""
    rewards = reward_scoring.answer_rewards(model, tokenizer, rows, settings.batch_size, settings.max_length)
    return [Score(reward_scoring.reward_metrics(rewards), len(rows), "rows")]


ANSWERS = EvalTask(
    name="reward",
    setting="eval_answer_files",
    flag="--answers",
    key="answers",
    help=f"Rewards of the answers in these .jsonl files, scored by a reward model run: rows {ANSWER_EXAMPLE} (or "
    "message lists).",
    read=FileReader((".jsonl",), partial(read_rows, parse=reward_scoring.answer_row)),
    score=None,
    check_tokenizer=reward_scoring.check_message_rows,
    score_with_reward=score_answers,
)


# The one list of tasks, in the order they run and their results are reported.
EVAL_TASKS: tuple[EvalTask, ...] = (TEXT, CHOICES, PREFERENCES, LM_EVAL, ANSWERS)
