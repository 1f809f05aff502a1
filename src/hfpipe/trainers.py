"""Trainer subclasses that change one behaviour of TRL's, for speed."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer
from trl import SFTTrainer

# What the model's forward needs from TRL's collated batch; the rest (masks TRL already folded into the
# labels) is not a model input.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class ModelLossSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss comes from the model's own head and cross-entropy.

    TRL computes the loss through a fused LM head; on CPU that falls back to a path 2.5-2.9x slower than a plain
    linear + cross-entropy. The labels TRL builds (prompt and padding at -100) are the same, so the loss is the
    same; TRL's extra training metrics (entropy, token accuracy) are not logged.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        model_inputs = {key: value for key, value in inputs.items() if key in MODEL_INPUTS}
        return Trainer.compute_loss(self, model, model_inputs, return_outputs, num_items_in_batch)
