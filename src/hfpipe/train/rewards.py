"""GRPO's rewards as a YAML list: read and checked before anything loads, then built into the callables TRL's
GRPOTrainer calls (`f(prompts, completions, completion_ids, **columns) -> list[float]`), one per entry, weighted.

Each entry holds one kind key, and optionally `weight` (default 1) and `name` (the metric's name, `rewards/<name>/
mean`; default the kind, or the function's name):
- `regex: PATTERN`: 1 when the completion, stripped, matches PATTERN entirely (Python `re.fullmatch`), else 0.
- `exact: COLUMN`: 1 when the completion, stripped, equals the row's COLUMN (stripped), else 0.
- `numeric: COLUMN`: 1 when the last number in the completion equals the row's COLUMN within `tolerance`
  (default 0), else 0.
- `length: TOKENS`: 1 at exactly TOKENS completion tokens, falling linearly to 0 at 0 and at twice TOKENS.
- `eos: true`: 1 when the completion ended with EOS (it stopped by itself), 0 when max_completion_length cut it.
- `model: DIR`: the score of a reward model (a `recipes/reward.py` output dir, full or LoRA), rendered exactly as
  that model was trained.
- `function: MODULE:FUNCTION`: your own function, imported from your project (the working directory is on the
  import path), called with TRL's reward arguments; it returns one float (or None) per completion.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from hfpipe.data.chat_templates import render_ids
from hfpipe.errors import ConfigError, DataError, did_you_mean
from hfpipe.models.pretrained import check_model_path, looks_local

KINDS = ("regex", "exact", "numeric", "length", "eos", "model", "function")
OPTIONS = {"weight", "name", "tolerance"}
CORRECTNESS_KINDS = ("exact", "numeric")  # held-out accuracy: the share of prompts the first of these scores 1
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
RewardFunc = Callable[..., list[float | None]]


@dataclass(frozen=True)
class RewardEntry:
    """One checked entry of `rewards:`."""

    index: int  # 1-based position in the list, for messages
    kind: str
    value: Any
    weight: float = 1.0
    name: str = ""
    tolerance: float = 0.0

    @property
    def label(self) -> str:
        """How messages name the entry: `rewards entry 2 (exact: answer)`."""
        return f"rewards entry {self.index} ({self.kind}: {self.value})"

    @property
    def column(self) -> str | None:
        """The dataset column the entry compares with, if any."""
        return self.value if self.kind in CORRECTNESS_KINDS else None


def read_reward_entries(raw: Any, where: str) -> list[RewardEntry]:
    """Check the config's `rewards:` list and return its entries; a user function is imported here, so that a
    missing module fails before any model loads."""
    if not raw:
        raise ConfigError(
            f"{where}: rewards: GRPO needs at least one reward, e.g. rewards: [{{numeric: answer}}]. Kinds: "
            f"{', '.join(KINDS)}."
        )
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: rewards: expected a list of entries such as {{regex: '^\\d+$', weight: 0.5}}.")
    entries = [_read_entry(item, index, where) for index, item in enumerate(raw, start=1)]
    names = [entry.name for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            f"{where}: rewards: the name '{duplicates[0]}' is used twice; give the entries distinct `name:` values "
            "(each is logged as rewards/<name>/mean)."
        )
    return entries


def _read_entry(item: Any, index: int, where: str) -> RewardEntry:
    here = f"{where}: rewards entry {index}"
    if not isinstance(item, dict):
        raise ConfigError(f"{here}: expected a mapping such as {{exact: answer}}, got {item!r}.")
    kinds = [key for key in item if key in KINDS]
    unknown = [key for key in item if key not in KINDS and key not in OPTIONS]
    if unknown:
        raise ConfigError(
            f"{here}: unknown key '{unknown[0]}'.{did_you_mean(str(unknown[0]), [*KINDS, *OPTIONS])} Kinds: "
            f"{', '.join(KINDS)}; options: weight, name, tolerance."
        )
    if len(kinds) != 1:
        found = f"has {', '.join(kinds)}" if kinds else "has none"
        raise ConfigError(f"{here}: needs exactly one kind key ({', '.join(KINDS)}); it {found}.")
    kind, value = kinds[0], item[kinds[0]]
    weight = _number(item.get("weight", 1.0), f"{here}: weight")
    tolerance = _number(item.get("tolerance", 0.0), f"{here}: tolerance")
    if "tolerance" in item and kind != "numeric":
        raise ConfigError(f"{here}: tolerance applies to numeric entries only. Remove it.")
    if tolerance < 0:
        raise ConfigError(f"{here}: tolerance must be 0 or more.")
    _check_value(kind, value, here)
    name = item.get("name", value.split(":")[1] if kind == "function" else kind)
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"{here}: name: {name!r}: use letters, digits, '_', '-' or '.'.")
    return RewardEntry(index, kind, value, weight, name, tolerance)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a number.")
    return float(value)


def _check_value(kind: str, value: Any, here: str) -> None:
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{here}: regex: expected a pattern string (quote it).")
        try:
            re.compile(value)
        except re.error as error:
            raise ConfigError(f"{here}: regex: {value!r} is not a valid pattern: {error}.") from None
    elif kind in CORRECTNESS_KINDS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{here}: {kind}: expected the name of the dataset column holding the answer.")
    elif kind == "length":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{here}: length: expected a target number of completion tokens (an integer > 0).")
    elif kind == "eos":
        if value is not True:
            raise ConfigError(f"{here}: eos: expected true (remove the entry to turn it off).")
    elif kind == "model":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{here}: model: expected a reward model dir (a recipes/reward.py output).")
        if not looks_local(value):
            raise ConfigError(f"{here}: model: '{value}': expected a local reward model dir.")
        check_model_path(value, "model", here)
    else:
        import_function(value, here)


def import_function(spec: Any, where: str) -> RewardFunc:
    """The function a `module:function` spec names, imported with the working directory on the import path (never
    evaluated from a string)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{where}: function: expected 'module:function' (e.g. my_rewards:brevity), got {spec!r}.")
    module_name, function_name = spec.split(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or an error raised by the module's own code: one line either way
        raise ConfigError(
            f"{where}: function: module '{module_name}' cannot be imported ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Run from the directory that holds it."
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        names = [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]
        raise ConfigError(
            f"{where}: function: '{module_name}' has no function '{function_name}'.{did_you_mean(function_name, names)}"
        )
    return function


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it: a string, or the assistant messages of a conversation."""
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion)
    return str(completion)


def _exact(completion: str, target: Any) -> float:
    return float(completion.strip() == str(target).strip())


def _numeric(completion: str, target: Any, tolerance: float) -> float:
    numbers = NUMBER.findall(completion.replace(",", ""))
    try:
        expected = float(str(target).replace(",", "").strip())
    except ValueError:
        return 0.0
    return float(bool(numbers) and abs(float(numbers[-1]) - expected) <= tolerance)


def _length(tokens: int, target: int) -> float:
    return max(0.0, 1.0 - abs(tokens - target) / target)


def build_reward_funcs(
    entries: Sequence[RewardEntry],
    eos_token_ids: Sequence[int],
    load_scorer: Callable[[str], tuple[torch.nn.Module, PreTrainedTokenizerBase]],
) -> list[RewardFunc]:
    """The callables for TRL, in entry order, each named after its entry. A user function that raises, or returns
    the wrong number of rewards, stops the run with one line naming the entry. `load_scorer(dir)` loads a reward
    model and its tokenizer."""
    return [_build(entry, tuple(eos_token_ids), load_scorer) for entry in entries]


def _build(entry: RewardEntry, eos_ids: tuple[int, ...], load_scorer) -> RewardFunc:
    kind, value = entry.kind, entry.value
    if kind == "regex":
        pattern = re.compile(value)

        def reward(completions, **_):
            return [float(pattern.fullmatch(completion_text(c).strip()) is not None) for c in completions]
    elif kind == "exact":

        def reward(completions, **columns):
            return [_exact(completion_text(c), t) for c, t in zip(completions, columns[value], strict=True)]
    elif kind == "numeric":

        def reward(completions, **columns):
            targets = columns[value]
            return [_numeric(completion_text(c), t, entry.tolerance) for c, t in zip(completions, targets, strict=True)]
    elif kind == "length":

        def reward(completion_ids, **_):
            return [_length(len(_without_eos(ids, eos_ids)), value) for ids in completion_ids]
    elif kind == "eos":

        def reward(completion_ids, **_):
            return [float(bool(ids) and ids[-1] in eos_ids) for ids in completion_ids]
    elif kind == "model":
        reward = reward_model_scores(*load_scorer(value))
    else:
        reward = _checked_user_function(import_function(value, entry.label), entry)
    reward.__name__ = entry.name
    return reward


def _without_eos(ids: Sequence[int], eos_ids: tuple[int, ...]) -> Sequence[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def reward_model_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16) -> RewardFunc:
    """A reward function scoring each prompt + completion (TRL's format: strings, or message lists) with a reward
    model, tokenized as RewardTrainer tokenized its training pairs (`render_ids`: the chat template, or the text plus
    EOS)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def reward(prompts, completions, **_):
        rows = [
            render_ids(tokenizer, {"prompt": p, "completion": c}) for p, c in zip(prompts, completions, strict=True)
        ]
        was_training, scores = model.training, []
        model.eval()  # no dropout; the model's own mode (a reward model still training) is given back after
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=model.device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=model.device)
            scores += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
        model.train(was_training)
        return scores

    return reward


def _checked_user_function(function: RewardFunc, entry: RewardEntry) -> RewardFunc:
    def reward(prompts, completions, **kwargs):
        try:
            values = function(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else ""
            raise DataError(f"{entry.label} raised {type(error).__name__}: {message}") from None
        values = list(values) if values is not None else []
        if len(values) != len(completions) or not all(v is None or isinstance(v, (int, float)) for v in values):
            raise DataError(
                f"{entry.label} returned {len(values)} values; expected one number (or None) per completion "
                f"({len(completions)})."
            )
        return values

    return reward


def _log_nothing(*args: Any, **kwargs: Any) -> None:
    return None


def outside_training() -> dict[str, Any]:
    """The keyword arguments TRL's trainer adds to every reward call, for calls outside training (the probe, the
    held-out scoring): no trainer state, and logging hooks that log nothing."""
    return {"trainer_state": None, "log_extra": _log_nothing, "log_metric": _log_nothing}


def probe_user_functions(entries: Sequence[RewardEntry], rows: Any) -> None:
    """Call each user function once on the first training rows with empty completions (in the shape TRL passes),
    before the model loads, so that one that cannot run on this data stops the run with nothing trained."""
    functions = [entry for entry in entries if entry.kind == "function"]
    if not functions:
        return
    sample = rows.select(range(min(2, len(rows))))
    prompts = list(sample["prompt"])
    completions = [[{"role": "assistant", "content": ""}] if isinstance(p, list) else "" for p in prompts]
    columns = {name: list(sample[name]) for name in sample.column_names if name != "prompt"}
    for entry in functions:
        reward = _checked_user_function(import_function(entry.value, entry.label), entry)
        reward(prompts=prompts, completions=completions, completion_ids=[[] for _ in prompts], **columns,
               **outside_training())  # fmt: skip


def required_columns(entries: Sequence[RewardEntry]) -> dict[str, str]:
    """The dataset columns the entries read, each with the first entry that reads it."""
    columns: dict[str, str] = {}
    for entry in entries:
        if entry.column is not None:
            columns.setdefault(entry.column, entry.label)
    return columns
