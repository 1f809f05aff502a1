"""The model-loading and decoding flags that `hfpipe generate`, `hfpipe chat` and `hfpipe serve` share, declared
once. Their values are checked by `hfpipe.tools.decoding.check_sampling_values`."""

from __future__ import annotations

import argparse

from hfpipe.tools.decoding import DEFAULT_MAX_NEW_TOKENS

DTYPES = ("auto", "float32", "float16", "bfloat16")


MODEL_HELP = "a run's output dir, an adapter dir, a .gguf file or packaged model name, or a Hub id"


def add_model_argument(parser: argparse.ArgumentParser, optional: bool) -> None:
    """Add the positional MODEL; `optional`: without it, the tool uses the newest finished run under outputs/."""
    if optional:
        parser.add_argument("model", nargs="?", help=f"{MODEL_HELP} (default: the newest finished run under outputs/)")
    else:
        parser.add_argument("model", help=MODEL_HELP)


def add_model_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the 'loading' group, the arguments of `load_for_inference`: --dtype, --device, --trust-remote-code."""
    loading = parser.add_argument_group("loading")
    loading.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    loading.add_argument("--device", help="e.g. cpu, cuda:0 (default: a GPU when present)")
    loading.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    return loading


def add_decoding_flags(
    parser: argparse.ArgumentParser, *, zero_temperature_greedy: bool, seed_help: str, per: str | None = None
) -> argparse._ArgumentGroup:
    """Add the 'decoding' group: --max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty, --seed.
    Returns the group, for a tool's own decoding flags.

    With `zero_temperature_greedy` (`hfpipe chat`) the temperature alone decides sampling: 0 decodes greedily and
    top-k/top-p apply once sampling is on; without it (`hfpipe generate`) a temperature must be above 0 and each
    sampling flag turns sampling on. `seed_help` says when the seed is set; `per` what one --max-new-tokens
    budget covers (e.g. 'per answer'). Check the values with `check_sampling_values(...,
    zero_temperature_greedy=...)` given the same choice.
    """
    turns_on = "" if zero_temperature_greedy else "; turns sampling on"
    temperature_help = "0 for greedy, more to sample (default: the model's)" if zero_temperature_greedy else "> 0"
    max_new_tokens_help = f"default: half the context, at most {DEFAULT_MAX_NEW_TOKENS}"
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument(
        "--max-new-tokens", type=int, help=f"{per} ({max_new_tokens_help})" if per else max_new_tokens_help
    )
    decoding.add_argument("--temperature", type=float, help=temperature_help + turns_on)
    decoding.add_argument("--top-k", type=int, help=f">= 0 (0: no top-k filter){turns_on}")
    decoding.add_argument("--top-p", type=float, help=f"in (0, 1]{turns_on}")
    decoding.add_argument("--repetition-penalty", type=float, help="> 0; 1 means none")
    decoding.add_argument("--seed", type=int, help=seed_help)
    return decoding
