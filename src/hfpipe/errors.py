"""User-facing errors: a mistake in a config, a flag or an input file is reported in one or two lines."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

import hfpipe_launch_hook

USER_ERROR_EXIT_CODE = hfpipe_launch_hook.USER_ERROR_EXIT_CODE

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix (bad config, bad flag, bad data). Printed without a traceback, exit code 2."""


class ConfigError(UserError):
    """A config file or command-line flag that cannot be used as written."""


class DataError(UserError):
    """An input data file or dataset that cannot be used as written."""


class DiskFullError(UserError):
    """The disk filled up while a run wrote to it; the run can resume once there is space."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return a " Did you mean 'X'?" suffix naming the candidate closest to `word`, or an empty string."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def exit_on_user_error(func: Callable[..., T]) -> Callable[..., T]:
    """Run `func`; turn a UserError into one line on stderr and exit code 2 instead of a traceback.

    Under `accelerate launch`, `torchrun` or `hfpipe pipeline` the line goes to the launcher, which prints each
    distinct line once, after its workers stopped (hfpipe_launch_hook).
    """

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return func(*args, **kwargs)
        except UserError as error:
            hfpipe_launch_hook.report(f"error: {error}")
            raise SystemExit(USER_ERROR_EXIT_CODE) from None

    return wrapper
