"""The SFT trainer: TRL's SFTTrainer with a faster training loss on CPU (see SFTArguments.use_model_loss)."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from transformers import Trainer
from trl import SFTTrainer

# What the model's forward needs from TRL's collated batch; the rest (masks TRL already folded into the
# labels) is not a model input.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
# Architectures whose logits are exactly output_embeddings(decoder(...).last_hidden_state): no logit soft-capping
# or scaling after the head. Others keep the model's own loss.
PLAIN_HEAD_MODELS = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo2", "smollm3"})


def labelled_positions_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """The causal-LM loss with the LM head applied only where a label is set: the same value as the model's own
    loss (sum over labelled tokens / `num_items_in_batch`, or their mean), without the logits of prompt and padding
    positions, which completion-only SFT does not train on."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
    hidden = base.get_decoder()(**model_inputs).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])
    total = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return total / num_items_in_batch


class FastSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss, with `model_loss`, comes from the model's own head and cross-entropy instead
    of TRL's fused LM head (on CPU that falls back to a path 2.5-2.9x slower), the head applied to labelled positions
    only where the architecture allows it and one process trains. The labels TRL builds (prompt and padding at
    -100) are the same, so the loss is the same; TRL's extra training metrics (entropy, token accuracy) are not
    logged."""

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
