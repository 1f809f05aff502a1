"""The SFT trainer: TRL's SFTTrainer with a faster training loss on CPU (see SFTArguments.use_model_loss): no
work on padding or on the logits of positions without a label, the same loss and gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import AttentionInterface, Trainer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from trl import SFTTrainer

# What the model's forward needs from TRL's collated batch; the rest (masks TRL already folded into the
# labels) is not a model input.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
# Architectures whose logits are exactly output_embeddings(decoder(...).last_hidden_state) (no logit soft-capping or
# scaling after the head) and whose attention goes through transformers' AttentionInterface. Others keep the
# model's own loss.
PLAIN_HEAD_MODELS = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo2", "smollm3"})


UNPADDED_ATTENTION = "hfpipe_unpadded"


@dataclass(frozen=True)
class RowLayout:
    """Where the real tokens of a padded batch sit: `index` into the flattened (rows x width) batch, and the
    additive attention mask of the padded layout (causal, pads masked)."""

    rows: int
    width: int
    index: torch.Tensor
    mask: torch.Tensor


def unpadded_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    row_layout: RowLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a batch whose real tokens were concatenated (1 x tokens): the queries, keys and values go back
    to the padded (rows x width) layout, attend within their own row only (causal, pads masked), and return
    concatenated. Everything else in the model (projections, MLP, norms) then runs on real tokens only."""
    layout = row_layout
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]

    def padded(states: torch.Tensor) -> torch.Tensor:  # (1, h, tokens, d) -> (rows, h, width, d)
        count = states.shape[1]
        flat = states.new_zeros(layout.rows * layout.width, count, dim)
        flat = flat.index_copy(0, layout.index, states[0].transpose(0, 1))
        return flat.view(layout.rows, layout.width, count, dim).transpose(1, 2)

    keys, values = padded(key), padded(value)
    if kv_heads != heads:  # grouped-query attention
        keys, values = keys.repeat_interleave(heads // kv_heads, 1), values.repeat_interleave(heads // kv_heads, 1)
    weights = torch.matmul(padded(query), keys.transpose(2, 3)) * (scaling or dim**-0.5) + layout.mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(values.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, values).transpose(1, 2).reshape(layout.rows * layout.width, heads, dim)
    return output.index_select(0, layout.index)[None], None


AttentionInterface.register(UNPADDED_ATTENTION, unpadded_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(UNPADDED_ATTENTION, lambda *args, **kwargs: None)  # RowLayout has the mask


def row_layout(attention_mask: torch.Tensor) -> RowLayout:
    """The RowLayout of a padded batch (either side) from its attention mask."""
    rows, width = attention_mask.shape
    real = attention_mask.bool()
    allowed = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()[None] & real[:, None, :]
    mask = torch.zeros(allowed.shape, device=real.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return RowLayout(rows, width, real.flatten().nonzero().squeeze(1), mask[:, None])


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Switch the model's attention implementation for the duration of the block."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def labelled_positions_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """The causal-LM loss of a padded batch computed on its real tokens only: the decoder runs on the rows'
    tokens concatenated (UNPADDED_ATTENTION keeps each row to itself), and the LM head only where a label is set.
    The same value as the model's own loss (sum over labelled tokens / `num_items_in_batch`, or their mean), without
    the work on padding and on the logits of prompt positions, which completion-only SFT does not train on."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    real = inputs["attention_mask"].bool()
    positions = (real.cumsum(1) - 1)[real][None]  # each row's own positions, whichever side it is padded on
    targets = inputs["labels"][real]  # each token's label; the prediction for it comes from the token before
    targets = torch.where(positions[0] == 0, -100, targets)[1:]  # no prediction across the start of a row
    with attention_implementation(base, UNPADDED_ATTENTION):
        hidden = base.get_decoder()(
            input_ids=inputs["input_ids"][real][None], position_ids=positions, row_layout=row_layout(real)
        ).last_hidden_state[0]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:-1][keep])
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])
    total = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return total / num_items_in_batch


class FastSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss, with `model_loss`, comes from the model's own head and cross-entropy instead
    of TRL's fused LM head (on CPU that falls back to a path 2.5-2.9x slower). Where the architecture allows it and
    one process trains, `labelled_positions_loss` also skips the padding and the logits of unlabelled positions.
    The labels TRL builds (prompt and padding at -100) are the same, so the loss is the same; TRL's extra training
    metrics (entropy, token accuracy) are not logged."""

    def __init__(self, *args: Any, model_loss: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_loss = model_loss
        self._head_on_labels_only: bool | None = None  # decided at the first training step

    def _can_skip_unlabelled_logits(self, model: torch.nn.Module) -> bool:
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if isinstance(unwrapped, PeftModel) else unwrapped
        return (
            self.accelerator.num_processes == 1  # the decoder is called directly, outside a DDP/FSDP wrapper
            and self.label_smoother is None
            and self.compute_loss_func is None
            and getattr(base.config, "model_type", None) in PLAIN_HEAD_MODELS
            and base.get_output_embeddings() is not None
            and (getattr(base.config, "sliding_window", None) or 10**9) >= (self.args.max_length or 10**9)
            and self.args.padding_free is False
            and not self.args.packing
            # Recomputation in the backward would run outside the switch to UNPADDED_ATTENTION.
            and not (self.args.activation_checkpointing or self.args.gradient_checkpointing)
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if not (self.model_loss and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._head_on_labels_only is None:
            self._head_on_labels_only = self._can_skip_unlabelled_logits(model)
        if self._head_on_labels_only and not return_outputs:
            counted = num_items_in_batch if self.model_accepts_loss_kwargs else None
            with self.accelerator.autocast():  # accelerate applies mixed precision in the model's forward, skipped here
                return labelled_positions_loss(self.accelerator.unwrap_model(model), inputs, counted)
        model_inputs = {key: value for key, value in inputs.items() if key in MODEL_INPUTS}
        return Trainer.compute_loss(self, model, model_inputs, return_outputs, num_items_in_batch)
