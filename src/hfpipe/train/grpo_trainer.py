"""The GRPO trainer: TRL's GRPOTrainer with the policy's log-probs computed over each prompt once.

A GRPO batch holds `num_generations` answers to each prompt, and the prompt is usually most of each row (SmolLM2 on
the shipped arithmetic task: ~40 prompt tokens, ~10 answer tokens). TRL runs the model over every row whole. Here
the decoder runs over each distinct prompt once, its KV cache (with its autograd graph) is repeated for the rows that
share it, and the decoder then runs over the answers only, on top of that cache. The positions, the masks and the
attention each answer token sees are TRL's, so the log-probs, the entropies and the gradients are the same up to
float rounding (tests/test_grpo_trainer.py); the decoder's work falls by the share of the batch that is repeated
prompt. The head then scores the answer tokens only (TRL's fused head scores every position off GPUs).

Used where it is exact and cheap to prove so: a text-only model whose logits are output_embeddings(decoder(...))
(PLAIN_HEAD_MODELS), a plain KV cache (no sliding window), no activation checkpointing (it turns the cache off), one
process (so no FSDP or DeepSpeed sharding the weights each decoder call gathers; DDP is untested), and a batch in
which some rows share a prompt. Anything else goes through TRL's own code.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer
from trl import GRPOTrainer
from trl.kernels import ChunkedLogProbFunction

from hfpipe.train.sft_trainer import PLAIN_HEAD_MODELS

CHUNK_SIZE = 32768  # vocabulary columns per tile of the head (TRL's own tile size)
PREFIX_FLAG = "_hfpipe_shared_prefix"  # True on a causal LM whose forward takes `shared_prefix`


@dataclass(frozen=True)
class SharedPrefix:
    """A batch's layout: each row's prompt group (groups numbered in order of first appearance), the first row of
    each group, and how many columns are the completion (the rest, left-padded, is the prompt)."""

    groups: torch.Tensor
    firsts: torch.Tensor
    completion_length: int


class PrefixSharingGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer; the policy's (and a separate reference model's) log-probs come from one decoder pass per
    distinct prompt (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for model in (self.model, self.ref_model):
            # one process: the decoder twice in one forward is plain autograd, but not yet tested under DDP here
            if model is not None and self.accelerator.num_processes == 1:
                add_shared_prefix_forward(
                    model.get_base_model() if isinstance(model, PeftModel) else model,
                    self.temperature,
                    self.args.cast_lm_head_to_fp32,
                )

    def _get_per_token_logps_and_entropies(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs (and entropies) of the completion tokens, as TRL computes them, in chunks of `batch_size` rows;
        each chunk's from a shared-prefix pass when the model and the chunk allow one."""
        if compute_aux_loss or any(value is not None for value in multimodal.values()) or not _takes_prefix(model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        rows = batch_size or input_ids.size(0)  # TRL's chunks, which bound the memory peak
        parts = []
        for start in range(0, input_ids.size(0), rows):
            ids, mask = input_ids[start : start + rows], attention_mask[start : start + rows]
            layout, output = shared_prefix_layout(ids, mask, logits_to_keep), None
            if layout is not None:
                with self.accelerator.autocast():
                    output = model(input_ids=ids, attention_mask=mask, shared_prefix=layout)
            if output is None:  # no shared prompt, or a model the shared pass does not fit
                logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                    model, ids, mask, logits_to_keep, compute_entropy=compute_entropy
                )
                parts.append((logps, entropies))
            else:
                parts.append((output.log_probs, output.entropy))
        logps = torch.cat([logps for logps, _ in parts])
        return logps, torch.cat([entropies for _, entropies in parts]) if compute_entropy else None, None


def shared_prefix_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int
) -> SharedPrefix | None:
    """Which rows of a (prompt + completion) batch share a prompt (ids and padding alike); None when none do."""
    prompts = torch.cat([input_ids[:, :-completion_length], attention_mask[:, :-completion_length]], dim=1)
    _, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    firsts: dict[int, int] = {}  # unique's group -> its first row
    for row, group in enumerate(inverse.tolist()):
        firsts.setdefault(group, row)
    if len(firsts) == len(inverse):
        return None
    rank = {group: index for index, group in enumerate(firsts)}
    groups = [rank[group] for group in inverse.tolist()]
    device = input_ids.device
    return SharedPrefix(torch.tensor(groups, device=device), torch.tensor(list(firsts.values()), device=device),
                        completion_length)  # fmt: skip


def _takes_prefix(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    checkpointing = "is_activation_checkpointing"  # transformers 5's name; the old one warns
    checkpointing = checkpointing if hasattr(inner, checkpointing) else "is_gradient_checkpointing"
    return bool(getattr(inner, PREFIX_FLAG, False)) and not getattr(inner, checkpointing, False)


def add_shared_prefix_forward(model: PreTrainedModel, temperature: float, cast_head_to_fp32: bool) -> None:
    """Let `model(input_ids=, attention_mask=, shared_prefix=layout)` return the completion tokens' log-probs and
    entropies from a shared-prefix pass, or None where that pass does not fit; every other call goes to the forward
    TRL patched in. A model outside PLAIN_HEAD_MODELS is left as it is."""
    if model.config.model_type not in PLAIN_HEAD_MODELS:
        return
    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # generate checks its kwargs against this signature
    def forward(self: PreTrainedModel, *args: Any, shared_prefix: SharedPrefix | None = None, **kwargs: Any) -> Any:
        if shared_prefix is None:
            return trl_forward(*args, **kwargs)
        ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
        plain = not args and all(value is None for value in kwargs.values())  # PEFT passes inputs_embeds=None, ...
        if not (plain and getattr(self, PREFIX_FLAG)):
            return None  # the trainer then runs TRL's pass
        output = shared_prefix_logps(self, shared_prefix, temperature, cast_head_to_fp32, ids, mask)
        if output is None:
            setattr(self, PREFIX_FLAG, False)  # not this model's cache: TRL's way from now on
        return output

    model.forward = types.MethodType(forward, model)
    setattr(model, PREFIX_FLAG, True)


def shared_prefix_logps(
    model: PreTrainedModel,
    layout: SharedPrefix,
    temperature: float,
    cast_head_to_fp32: bool,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> types.SimpleNamespace | None:
    """The completion tokens' log-probs and entropies, (rows, completion length), zero at padding; None for a
    model whose cache is not plain tensors. The prompt is left-padded (TRL's layout), so its last column is each
    row's last prompt token."""
    groups, firsts, prefix = layout.groups, layout.firsts, input_ids.shape[1] - layout.completion_length
    decoder = model.base_model
    prompt_ids, prompt_mask = input_ids[firsts, :prefix], attention_mask[firsts, :prefix]
    prompts = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    cache = prompts.past_key_values
    if not all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding windows, ...
        return None
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, groups), layer.values.index_select(0, groups)
    answers = decoder(
        input_ids=input_ids[:, prefix:], attention_mask=attention_mask, past_key_values=cache, use_cache=True
    )
    # position prefix - 1 predicts the first completion token, completion position i the token i + 1
    last_prompt = prompts.last_hidden_state[:, -1:].index_select(0, groups)
    hidden = torch.cat([last_prompt, answers.last_hidden_state[:, :-1]], dim=1)
    labels = input_ids[:, prefix:]
    mask = attention_mask[:, prefix:].bool()
    lm_head = model.get_output_embeddings()
    scored = hidden[mask].to(lm_head.weight.device)
    context = torch.autocast(scored.device.type, enabled=False) if cast_head_to_fp32 else contextlib.nullcontext()
    with context:
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
            scored.float() if cast_head_to_fp32 else scored, lm_head.weight, lm_head.bias, labels[mask],
            temperature, CHUNK_SIZE, None, 1.0, ("log_probs", "entropy"),
        )  # fmt: skip
    mask = mask.to(log_probs.device)
    return types.SimpleNamespace(
        log_probs=log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs),
        entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
    )
