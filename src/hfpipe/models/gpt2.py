"""A from-scratch GPT-2: size presets, explicit shape fields on top, checks, and the randomly initialised model."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from hfpipe.errors import ConfigError
from hfpipe.sections import GPT2ShapeArguments

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
        # GPT-2's own tanh GELU (gelu_new), as one fused kernel: gelu_new's six elementwise ops made a training step
        # of the nanoGPT CPU model 1.2x slower (68 vs 57 ms). Same function, so exports and readers see GPT-2.
        activation_function="gelu_pytorch_tanh",
        # GPT2Config defaults bos/eos to 50256, outside a small trained vocabulary.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return with_causal_lm_loss(model)


def with_causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name the model's loss a causal-LM one where its class name does not (GPT2LMHeadModel's loss_type is None).

    The Trainer divides the summed loss by the labels it counts, and counts the shifted labels (one prediction
    fewer per row) only for a ForCausalLM loss: without this a block of 128 tokens reports 127/128 of its loss.
    """
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model
