"""Token log-probabilities for `hfpipe serve`, shaped as OpenAI returns them: the legacy completions `logprobs` object
(tokens, token_logprobs, top_logprobs, text_offset; the first echoed token has no log-prob) and the chat
`logprobs.content` list. The values are read off the decoding pass (an echoed prompt's from its prefill, each new
token's from its step), or from one forward pass for a prompt scored alone; either way the log-softmax of the raw
logits of each token given the ones before it, as `hfpipe eval` scores multiple-choice endings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_choice import Logprobs
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class TokenScore:
    """One token and its log-prob given the tokens before it (None for the first token of a sequence), with the
    `top` most likely tokens at its position, most likely first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


def score_tokens(
    model: PreTrainedModel, ids: list[int], first: int, top: int, adapter: str | None = None
) -> list[TokenScore]:
    """Scores of ids[first:], each given ids[:position], with `top` alternatives per position (with the LoRA
    `adapter` of a multi-adapter PeftModel, when given)."""
    options = {} if adapter is None else {"adapter_names": [adapter]}
    with torch.inference_mode():
        input_ids = torch.tensor([ids], device=model.device)
        mask = torch.ones_like(input_ids)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, **options).logits
    start = max(first, 1)
    scores = [TokenScore(ids[0], None, [])] if first == 0 else []
    return scores + scores_at(logits[0, start - 1 : -1], ids[start:], top)


def scores_at(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenScore]:
    """The score of tokens[i] under the next-token logits row i (log-softmax in float32), with `top` alternatives."""
    if not tokens:
        return []
    with torch.inference_mode():
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
        best = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        best_ids, best_logprobs = best.indices.tolist(), best.values.tolist()
    return [
        TokenScore(token, logprob, list(zip(ids, values, strict=True)))
        for token, logprob, ids, values in zip(tokens, chosen, best_ids, best_logprobs, strict=True)
    ]


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token as text (special tokens kept: an end-of-text token shows as itself)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, scores: list[TokenScore], offset: int) -> Logprobs:
    """The legacy completions logprobs object; `offset` is where the first token's text starts in prompt +
    completion (0 with echo, the prompt's length without)."""
    tokens = [token_text(tokenizer, score.token_id) for score in scores]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops: list[dict[str, float] | None] = []
    for score in scores:
        if score.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token_id, logprob in score.top:
            top.setdefault(token_text(tokenizer, token_id), logprob)  # two ids can decode alike: keep the likelier
        tops.append(top)
    return Logprobs.construct(
        tokens=tokens, token_logprobs=[score.logprob for score in scores], top_logprobs=tops, text_offset=offsets
    )


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, scores: list[TokenScore]) -> ChoiceLogprobs:
    """The chat choice's logprobs: one entry per generated token with its top alternatives."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "bytes": list(token.encode("utf-8")), "logprob": logprob}

    content = []
    for score in scores:
        assert score.logprob is not None  # chat never scores the prompt
        top = [TopLogprob(**entry(token_text(tokenizer, token_id), logprob)) for token_id, logprob in score.top]
        token = token_text(tokenizer, score.token_id)
        content.append(ChatCompletionTokenLogprob(**entry(token, score.logprob), top_logprobs=top))
    return ChoiceLogprobs(content=content, refusal=None)
