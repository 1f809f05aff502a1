"""Decoding settings shared by `hfpipe generate`, `hfpipe chat` and `hfpipe serve`: their checks, the
GenerationConfig they make, a one-line description of it, and one `model.generate` call."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hfpipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MAX_NEW_TOKENS = 128


def cli_flag(field: str) -> str:
    """The command-line flag of a generation field: 'top_p' -> '--top-p'."""
    return "--" + field.replace("_", "-")


def check_sampling_values(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    name: Callable[[str], str] = cli_flag,
    zero_temperature_greedy: bool = False,
) -> None:
    """Raise a one-line ConfigError naming the first out-of-range value; None means "not given" and passes.

    `name` turns a field name into what the user typed (a CLI flag by default; an HTTP server can pass
    `lambda field: field` to name JSON fields). With `zero_temperature_greedy` a temperature of 0 is allowed and
    means greedy decoding (`hfpipe chat`); otherwise it must be above 0, as a temperature turns sampling on.
    """
    if zero_temperature_greedy:
        temperature_rule = (lambda v: v >= 0 and math.isfinite(v), "must be 0 (greedy) or more")
    else:
        temperature_rule = (lambda v: v > 0, "must be greater than 0 (greedy decoding needs no temperature)")
    rules = [
        ("temperature", temperature, *temperature_rule),
        ("top_k", top_k, lambda v: v >= 0, "must be 0 (no top-k filter) or more"),
        ("top_p", top_p, lambda v: 0 < v <= 1, "must be greater than 0 and at most 1"),
        ("repetition_penalty", repetition_penalty, lambda v: v > 0, "must be greater than 0 (1 means no penalty)"),
        ("max_new_tokens", max_new_tokens, lambda v: v > 0, "must be greater than 0"),
        ("num_beams", num_beams, lambda v: v >= 1, "must be 1 or more"),
    ]
    for field, value, valid, rule in rules:
        if value is not None and not valid(value):  # written as "not valid" so that NaN fails too
            raise ConfigError(f"{name(field)} {value}: {rule}.")


def default_max_new_tokens(context: int | None) -> int:
    """New tokens when none are asked for: half the context, at most DEFAULT_MAX_NEW_TOKENS."""
    return DEFAULT_MAX_NEW_TOKENS if context is None else max(1, min(DEFAULT_MAX_NEW_TOKENS, context // 2))


def build_generation_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int | None = None,
) -> GenerationConfig:
    """A copy of the model's own generation config with the given values on top, ready for `model.generate`.

    Sampling is on when `do_sample` is True, or when it is None and a temperature, top-k or top-p is given;
    otherwise decoding is greedy (beam search with `num_beams` > 1). Values left None keep the model's
    generation_config.json, then transformers' defaults. The pad token is the tokenizer's pad (or EOS), and EOS
    the tokenizer's when the model names none.
    """
    from transformers import GenerationConfig

    config = GenerationConfig() if model.generation_config is None else copy.deepcopy(model.generation_config)
    sampling = do_sample if do_sample is not None else any(v is not None for v in (temperature, top_k, top_p))
    given = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "num_beams": num_beams,
    }
    config.update(
        max_new_tokens=max_new_tokens, do_sample=sampling, **{k: v for k, v in given.items() if v is not None}
    )
    if tokenizer is not None:
        if config.eos_token_id is None:
            config.eos_token_id = tokenizer.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
    return config


def describe_decoding(config: GenerationConfig) -> str:
    """One line on how a generation config decodes: 'greedy', 'beam search 4' or the sampling values."""
    if config.do_sample:
        knobs = [f"temperature {config.temperature if config.temperature is not None else 1.0}"]
        knobs.append(f"top-k {config.top_k if config.top_k is not None else 50}")
        knobs.append(f"top-p {config.top_p if config.top_p is not None else 1.0}")
        text = "sampling, " + ", ".join(knobs)
    else:
        text = f"beam search {config.num_beams}" if (config.num_beams or 1) > 1 else "greedy"
    if config.repetition_penalty not in (None, 1.0):
        text += f", repetition penalty {config.repetition_penalty}"
    return f"{text}, at most {config.max_new_tokens} new tokens"


def generate_ids(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    generation_config: GenerationConfig,
    streamer: Any = None,
    seed: int | None = None,
) -> list[int]:
    """The new token ids `model.generate` writes after one prompt; seeded first when `seed` is given."""
    import torch
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    input_ids = torch.tensor([list(prompt_ids)], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=generation_config,
        streamer=streamer,
    )
    return output[0, input_ids.shape[1] :].tolist()
