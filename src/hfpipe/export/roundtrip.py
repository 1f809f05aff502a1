"""The check that an exported GGUF file is the model it came from: transformers loads it back (weights and
tokenizer), its logits match the source model's within the type's tolerance, greedy decoding picks the source's
tokens, and the tokenizer renders and encodes prompts exactly as the saved one does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hfpipe.errors import UserError
from hfpipe.tools.prompts import context_length, encode_prompt, render_chat_prompt, render_prompt

# Largest |logit difference| allowed between the source model and the file read back, as a fraction of the
# source's largest |logit|. Measured (f16, bf16, q8_0): SmolLM2-135M-Instruct 1.0e-3, 7e-3, 3.3e-2; the tests' tiny
# Llama, randomly initialised at 10x the usual scale and so far more sensitive to rounding, 3.1e-3, 2.0e-2, 6.7e-2;
# f32 is exact. Each limit is 2-3x the worst of these; a wrong tensor layout differs by about 1.
TOLERANCES: dict[str, float] = {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1.5e-1}
PROMPTS = ("What is the capital of France?", "The king and the queen", "Write one line about the night.")
# Encoded by both tokenizers as well: digits, accents, punctuation, runs of spaces, tabs and newlines.
TOKENIZER_TEXT = "In 1599, 42 actors  played\tthe Globe: naïve, émigré, ¿qué? — «fine»!\n\n  End."
CONVERSATION = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "A small model, trained with hfpipe."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY_TOKENS = 8
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class RoundTripError(UserError):
    """The exported file does not reproduce the source model."""


@dataclass
class RoundTrip:
    """What the check measured; `problems` is empty when the file passed."""

    type: str
    tolerance: float
    max_abs_logit_diff: float = 0.0
    max_abs_logit: float = 0.0
    greedy_tokens: int = 0
    greedy_equal: int = 0
    greedy_near_ties: int = 0  # differing picks where the source's two candidates were within the tolerance
    chat_prompt_equal: bool | None = None  # None: the model has no chat template
    prompt_ids_equal: bool = True
    special_tokens_equal: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when the file reproduced the source model."""
        return not self.problems

    def record(self) -> dict[str, Any]:
        """The check as a JSON-ready dict, for the run's export record."""
        return {"passed": self.passed, "allowed": self.allowed, **vars(self)}

    def summary(self) -> str:
        """One line: the logit difference against its limit, greedy tokens, tokenizer."""
        chat = {None: "no chat template", True: "chat prompt equal", False: "chat prompt DIFFERS"}
        return (
            f"max |logit diff| {self.max_abs_logit_diff:.2e} (limit {self.allowed:.2e}), greedy tokens "
            f"{self.greedy_equal}/{self.greedy_tokens} equal ({self.greedy_near_ties} near ties), "
            f"{chat[self.chat_prompt_equal]}, prompt ids {'equal' if self.prompt_ids_equal else 'DIFFER'}"
        )

    @property
    def allowed(self) -> float:
        """The largest |logit difference| allowed for this model and type."""
        return self.tolerance * self.max_abs_logit


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (float32, dequantized) and tokenizer transformers builds from the GGUF file at `path`."""
    directory, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if config.model_type == "gpt2" and getattr(config, "n_ctx", None):
        # transformers reads gpt2.context_length into n_ctx, which GPT2Config no longer uses (it keeps n_positions).
        config.n_positions = config.n_ctx
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model.eval(), tokenizer


def check_round_trip(
    source: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    path: Path,
    type_name: str,
    stop_ids: list[int],
) -> RoundTrip:
    """Load `path` back and compare it with `source` and its `tokenizer` on PROMPTS (rendered in `prompt_format`)
    and CONVERSATION; the result lists every difference beyond the type's tolerance."""
    loaded, loaded_tokenizer = load_gguf(path)
    result = RoundTrip(type=type_name, tolerance=TOLERANCES[type_name])
    _compare_tokenizers(tokenizer, loaded_tokenizer, prompt_format, result)
    _compare_logits(
        source, loaded, [_prompt_ids(tokenizer, prompt, prompt_format) for prompt in PROMPTS], stop_ids, result
    )
    return result


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_format: str) -> list[int]:
    return encode_prompt(tokenizer, render_prompt(tokenizer, prompt, prompt_format), prompt_format)


def _compare_tokenizers(
    tokenizer: PreTrainedTokenizerBase, loaded: PreTrainedTokenizerBase, prompt_format: str, result: RoundTrip
) -> None:
    """Special tokens, the rendered chat prompt and the ids of every prompt must be the saved tokenizer's."""
    different = [name for name in SPECIAL_TOKENS if getattr(tokenizer, name) not in (None, getattr(loaded, name))]
    if different:
        result.special_tokens_equal = False
        result.problems.append(f"the file's tokenizer has other special tokens ({', '.join(different)})")
    if tokenizer.chat_template or loaded.chat_template:
        both = bool(tokenizer.chat_template and loaded.chat_template)
        result.chat_prompt_equal = both and (
            render_chat_prompt(tokenizer, CONVERSATION) == render_chat_prompt(loaded, CONVERSATION)
        )
        if not result.chat_prompt_equal:
            result.problems.append("the file's tokenizer renders the chat prompt differently")
    texts = [render_prompt(tokenizer, prompt, prompt_format) for prompt in PROMPTS]
    if prompt_format != "raw":
        texts.append(render_chat_prompt(tokenizer, CONVERSATION))
    for text in [*texts, TOKENIZER_TEXT]:
        if encode_prompt(tokenizer, text, prompt_format) != encode_prompt(loaded, text, prompt_format):
            result.prompt_ids_equal = False
    if not result.prompt_ids_equal:
        result.problems.append("the file's tokenizer encodes the prompts to other token ids")


def _compare_logits(
    source: PreTrainedModel,
    loaded: PreTrainedModel,
    prompts: list[list[int]],
    stop_ids: list[int],
    result: RoundTrip,
) -> None:
    """On each prompt and the source's greedy continuation of it, the file's logits must be within the tolerance
    of the source's, and its greedy picks the source's."""
    runs = []
    with torch.no_grad():
        for prompt in prompts:
            ids, start = _greedy(source, prompt, stop_ids)
            runs.append((source(ids).logits[0].float(), loaded(ids).logits[0].float(), ids[0], start))
    result.max_abs_logit = max(expected.abs().max().item() for expected, _, _, _ in runs)
    result.max_abs_logit_diff = max((expected - got).abs().max().item() for expected, got, _, _ in runs)
    if result.max_abs_logit_diff > result.allowed:
        result.problems.append(
            f"logits differ by up to {result.max_abs_logit_diff:.3g}, more than the {result.type} limit "
            f"{result.allowed:.3g}"
        )
    for expected, got, ids, start in runs:
        _compare_greedy(expected, got, ids, start, result)


def _greedy(model: PreTrainedModel, prompt_ids: list[int], stop_ids: list[int]) -> tuple[torch.Tensor, int]:
    """The prompt followed by the source model's greedy continuation (GREEDY_TOKENS at most, ending at a stop
    token), as one row of ids, and where the continuation starts."""
    context = context_length(model) or len(prompt_ids) + GREEDY_TOKENS
    prompt_ids = prompt_ids[-max(context - GREEDY_TOKENS, 1) :]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model(ids, use_cache=True)
        for _ in range(min(GREEDY_TOKENS, context - len(prompt_ids))):
            next_id = output.logits[0, -1].argmax().view(1, 1)
            ids = torch.cat([ids, next_id], dim=1)
            if next_id.item() in stop_ids:
                break
            output = model(next_id, past_key_values=output.past_key_values, use_cache=True)
    return ids, len(prompt_ids)


def _compare_greedy(
    expected: torch.Tensor, got: torch.Tensor, ids: torch.Tensor, start: int, result: RoundTrip
) -> None:
    """At each continuation position the file's greedy pick must be the source's, unless the source's two
    candidates are closer than the logits differ (a near tie that the file's rounding may break either way)."""
    for position in range(start - 1, ids.shape[0] - 1):
        wanted, picked = ids[position + 1].item(), got[position].argmax().item()
        result.greedy_tokens += 1
        if picked == wanted:
            result.greedy_equal += 1
        elif expected[position, wanted] - expected[position, picked] <= 2 * result.max_abs_logit_diff:
            result.greedy_near_ties += 1
        else:
            result.problems.append(
                f"greedy decoding picks token {picked} where the source picks {wanted} (position {position + 1})"
            )
            return
