"""`hfpipe check --show-samples N`: training rows as the model sees them, trained-on spans marked."""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from hfpipe.data.chat_templates import render_ids, render_prompt_ids

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around the tokens the loss covers


def loss_mask(row: dict, tokenizer: PreTrainedTokenizerBase, loss_mode: str) -> tuple[list[int], list[int]]:
    """Token ids of a converted row and a 0/1 mask of the tokens the loss covers, as TRL builds them."""
    ids = render_ids(tokenizer, row)
    if loss_mode == "assistant":
        encoded = tokenizer.apply_chat_template(row["messages"], return_assistant_tokens_mask=True, return_dict=True)
        return list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if loss_mode == "completion":
        prompt_length = len(render_prompt_ids(tokenizer, row))
        return ids, [0] * prompt_length + [1] * (len(ids) - prompt_length)
    return ids, [1] * len(ids)


def show_samples(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, loss_mode: str, count: int, max_length: int
) -> str:
    """Render the first `count` rows: text with ⟦trained⟧ spans, token counts and truncation."""
    blocks = []
    for index, row in enumerate(dataset.select(range(min(count, len(dataset)))), start=1):
        ids, mask = loss_mask(row, tokenizer, loss_mode)
        kept_ids, kept_mask = ids[:max_length], mask[:max_length]
        pieces, inside = [], False
        for token, trained in zip(kept_ids, kept_mask, strict=True):
            if trained != inside:
                pieces.append(OPEN if trained else CLOSE)
                inside = bool(trained)
            pieces.append(tokenizer.decode([token]))
        if inside:
            pieces.append(CLOSE)
        cut = len(ids) - len(kept_ids)
        header = (
            f"--- sample {index}: {len(ids)} tokens, {sum(kept_mask)} trained on"
            + (f", {cut} cut by max_length={max_length}" if cut else f", fits max_length={max_length}")
            + f", ends with EOS {tokenizer.eos_token!r}: {kept_ids[-1] == tokenizer.eos_token_id} ---"
        )
        blocks.append(header + "\n" + "".join(pieces))
    return "\n".join(blocks)
