"""Models: a from-scratch GPT-2 from explicit shape fields, or a pretrained causal LM."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hfpipe.args import GPT2ShapeArguments
from hfpipe.errors import ConfigError

GPT2_PRESETS: dict[str, dict[str, int]] = {
    "micro": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "tiny": {"n_layer": 6, "n_head": 6, "n_embd": 384},
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
}
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "n_positions")


def resolve_shape(shape: GPT2ShapeArguments, block_size: int) -> dict[str, int]:
    """Return n_layer, n_head, n_embd and n_positions: the preset with the explicit fields on top."""
    resolved = dict(GPT2_PRESETS[shape.model_size])
    resolved["n_positions"] = block_size
    for key in SHAPE_KEYS:
        value = getattr(shape, key)
        if value is not None:
            resolved[key] = value
    return resolved


def check_shape(shape: GPT2ShapeArguments, block_size: int, where: str) -> dict[str, int]:
    """Validate a from-scratch shape; return it resolved."""
    resolved = resolve_shape(shape, block_size)
    for key, value in resolved.items():
        if value <= 0:
            raise ConfigError(f"{where}: {key}: {value} must be greater than 0.")
    if resolved["n_embd"] % resolved["n_head"]:
        raise ConfigError(
            f"{where}: n_embd={resolved['n_embd']} is not divisible by n_head={resolved['n_head']}; "
            "pick n_embd as a multiple of n_head."
        )
    if block_size > resolved["n_positions"]:
        raise ConfigError(f"{where}: block_size={block_size} exceeds n_positions={resolved['n_positions']}.")
    if not 0.0 <= shape.dropout < 1.0:
        raise ConfigError(f"{where}: dropout: {shape.dropout} must be in [0, 1).")
    return resolved


def build_gpt2(shape: dict[str, int], dropout: float, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """Build a randomly initialised GPT-2 sized for `tokenizer`."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT2Config defaults bos/eos to 50256, outside a small trained vocabulary.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def looks_local(name: str) -> bool:
    """True when `name` is meant as a local path rather than a Hub id."""
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith((".gguf", ".safetensors"))
    )


# Output dirs that earlier stages of a pipeline will write: later stages' configs are checked before they exist.
planned_outputs: set[str] = set()


def check_model_path(name: str, key: str, where: str) -> None:
    """A local model or tokenizer path must exist and be a directory (or be a planned pipeline output)."""
    if name in planned_outputs:
        return
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{where}: {key}: '{name}' is not a directory. Give a model output dir or a Hub id.")


def load_tokenizer_from(
    name: str, key: str, revision: str = "main", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a pretrained tokenizer; a load failure is a one-line ConfigError naming the config key."""
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ConfigError(f"{key}: no tokenizer could be loaded from '{name}': {str(error).splitlines()[0]}") from None


def load_causal_lm(
    name: str, revision: str, dtype: str | None, attn: str | None, trust_remote_code: bool
) -> PreTrainedModel:
    """Load a pretrained causal LM from safetensors weights; a load failure is a one-line ConfigError."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            dtype=dtype or "auto",
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except OSError as error:
        raise ConfigError(f"model_name_or_path: '{name}' could not be loaded: {str(error).splitlines()[0]}") from None
