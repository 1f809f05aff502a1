"""Strict YAML + CLI parsing on top of `trl.TrlParser`.

A config is one flat YAML mapping whose keys are the field names of the recipe's dataclasses
(`TrainingArguments`, TRL configs, `ModelConfig`, ours). Command-line flags override YAML keys. Every
mistake becomes a `ConfigError` naming the file, the key, the value and what was expected, raised before
any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from trl import TrlParser

from hfpipe.errors import ConfigError, did_you_mean

# Keys that recent transformers / TRL releases renamed or removed, with the names to use now.
RENAMED_KEYS: dict[str, tuple[str, ...]] = {
    "torch_dtype": ("dtype",),
    "max_seq_length": ("max_length", "block_size"),
    "evaluation_strategy": ("eval_strategy",),
    "warmup_ratio": ("warmup_steps",),
    "no_cuda": ("use_cpu",),
    "per_gpu_train_batch_size": ("per_device_train_batch_size",),
    "per_gpu_eval_batch_size": ("per_device_eval_batch_size",),
    "push_to_hub_token": ("hub_token",),
    "push_to_hub_model_id": ("hub_model_id",),
    "push_to_hub_organization": ("hub_model_id",),
    "max_prompt_length": ("max_length",),
}

# TrainingArguments fields, and TRL's max_length (SFT and DPO), that must be strictly positive when set.
POSITIVE_KEYS = frozenset(
    {
        "max_length",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "num_train_epochs",
        "max_eval_samples",
    }
)

# Never written to saved configs, reports or logs.
SECRET_KEYS = frozenset({"hub_token"})


@dataclass
class ParsedConfig:
    """The dataclasses of one run plus what the user wrote, for saving a resolved config."""

    values: tuple[Any, ...]
    path: Path | None
    user_keys: dict[str, Any]

    def get(self, cls: type) -> Any:
        """Return the parsed instance of dataclass `cls`."""
        return next(value for value in self.values if isinstance(value, cls))

    def find(self, cls: type) -> Any | None:
        """The parsed instance of dataclass `cls`, None when this config has no such section."""
        return next((value for value in self.values if isinstance(value, cls)), None)


class _Mismatch(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


class _StrictParser(TrlParser):
    """TrlParser whose argparse errors become ConfigError instead of a usage dump."""

    def error(self, message: str) -> typing.NoReturn:  # argparse hook
        raise ConfigError(f"command line: {message}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is written twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a non-empty mapping; every problem is a one-line ConfigError."""
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ConfigError(f"{path}: config file not found{hint}. Check the path after --config.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}.") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty. Write one 'key: value' per line (see configs/).")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of 'key: value' lines at the top level, got a {type(data).__name__}."
        )
    return data


def coerce(value: Any, hint: Any) -> Any:
    """Check `value` against the type annotation `hint` and convert where YAML is loose (`1e-3` is a str).

    Raises `_Mismatch` with a description of what was expected. Types we do not model pass through for the
    library to validate.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        enums = [arm for arm in arms if isinstance(arm, type) and issubclass(arm, enum.Enum)]
        if enums and isinstance(value, str):
            return coerce(value, enums[0])
        expected = []
        for arm in arms:
            try:
                return coerce(value, arm)
            except _Mismatch as mismatch:
                expected.append(mismatch.expected)
        raise _Mismatch(" or ".join(dict.fromkeys(expected)))
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(str(arg) for arg in args)
        raise _Mismatch(f"one of {choices}{did_you_mean(str(value), [str(a) for a in args])}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [member.value for member in hint]
        if isinstance(value, hint) or value in choices:
            return value
        raise _Mismatch(f"one of {', '.join(map(str, choices))}{did_you_mean(str(value), map(str, choices))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string (quote it)")
    if origin is list or hint is list:
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict):
            raise _Mismatch("a list")
        return [coerce(item, args[0]) for item in items] if args else items
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping")
    return value


def _field_index(dataclass_types: Sequence[type]) -> dict[str, Any]:
    index: dict[str, Any] = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init:
                index.setdefault(field.name, hints[field.name])
    return index


def _unknown_key_message(where: str, key: str, known: dict[str, Any], noun: str = "key") -> str:
    for new_name in RENAMED_KEYS.get(key, ()):
        if new_name in known:
            return f"{where}: {noun} '{key}' was renamed in recent transformers/TRL releases: use '{new_name}'."
    return f"{where}: unknown {noun} '{key}'.{did_you_mean(key, known)} Run with --help to list every key."


def check_values(where: str, values: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """Validate keys and value types of a config mapping; return the values converted to their field types."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a name. Keys are setting names like learning_rate.")
        if key not in known:
            raise ConfigError(_unknown_key_message(where, key, known))
        try:
            checked[key] = coerce(value, known[key])
        except _Mismatch as mismatch:
            raise ConfigError(f"{where}: {key}: {value!r} is not valid; expected {mismatch.expected}.") from None
        number = checked[key]
        if key in POSITIVE_KEYS and isinstance(number, (int, float)) and number <= 0:
            raise ConfigError(f"{where}: {key}: {value!r} must be greater than 0.")
    return checked


def _cli_keys(argv: Sequence[str], known: dict[str, Any]) -> list[str]:
    keys = []
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name not in known:
                raise ConfigError(_unknown_key_message("command line", name, known, noun="flag"))
            keys.append(name)
    return keys


def _split_config_flag(argv: list[str]) -> tuple[Path | None, list[str]]:
    if "--config" not in argv:
        return None, argv
    position = argv.index("--config")
    if position + 1 >= len(argv) or argv[position + 1].startswith("--"):
        raise ConfigError("command line: --config needs a path to a YAML file.")
    return Path(argv[position + 1]), argv[:position] + argv[position + 2 :]


def parse(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    derive: Callable[[dict[str, Any], str], None] | None = None,
    check: Callable[[dict[str, Any], str], None] | None = None,
) -> ParsedConfig:
    """Parse `--config FILE` plus CLI overrides into `dataclass_types`, strictly.

    `defaults` replace the dataclasses' own defaults (YAML and CLI still win). On the merged values, before any
    dataclass is built: `derive(values, where)` fills in settings that follow from others (it may raise when it
    cannot), then `check(values, where)` raises ConfigError for what cannot run and changes nothing.
    Nothing is loaded or written here.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _StrictParser(dataclass_types).parse_args_into_dataclasses(args=["--help"])
    path, cli_args = _split_config_flag(argv)
    known = _field_index(dataclass_types)
    yaml_values: dict[str, Any] = {}
    if path is not None:
        yaml_values = load_yaml_mapping(path)
        env = yaml_values.pop("env", None)
        if env is not None:
            if not isinstance(env, dict):
                raise ConfigError(f"{path}: env: expected a mapping of environment variable names to values.")
            for name, value in env.items():
                os.environ[str(name)] = str(value)
        yaml_values = check_values(str(path), yaml_values, known)
    cli_keys = _cli_keys(cli_args, known)
    where = str(path) if path else "command line"

    parser = _StrictParser(dataclass_types)
    parser.set_defaults_with_config(**{**(defaults or {}), **yaml_values})
    namespace, remaining = parser.parse_known_args(args=cli_args)
    if remaining:
        raise ConfigError(f"command line: unexpected arguments {' '.join(remaining)}. Flags look like --key value.")
    merged = vars(namespace)
    for key in cli_keys:
        check_values("command line", {key: merged[key]}, known)
    for hook in (derive, check):
        if hook is not None:
            hook(merged, where)

    values = []
    for cls in dataclass_types:
        names = {field.name for field in dataclasses.fields(cls) if field.init}
        try:
            values.append(cls(**{name: merged[name] for name in names if name in merged}))
        except (ValueError, TypeError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{where}: {message}") from None
    user_keys = {**yaml_values, **{key: merged[key] for key in cli_keys}}
    return ParsedConfig(values=tuple(values), path=path, user_keys=user_keys)


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Return `settings` without secrets, for saved configs, logs and cards."""
    return {key: value for key, value in settings.items() if key not in SECRET_KEYS}
