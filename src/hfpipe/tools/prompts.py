"""Prompts rendered as the model was trained, shared by `hfpipe generate`, `hfpipe chat` and `hfpipe serve`, and
the context they must fit.

Formats (FORMATS): 'chat' renders role/content messages with the tokenizer's chat template and its generation
prompt; 'instruction' uses the '### Instruction:' layout that hfpipe's SFT trains on when there is no template;
'raw' passes the text as given. `pick_format` chooses chat when the tokenizer has a template, instruction for an
hfpipe SFT or DPO run dir without one, and raw otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hfpipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMATS = ("chat", "instruction", "raw")


def instruction_prompt(instruction: str) -> str:
    """The '### Instruction:' prompt hfpipe's SFT trains on (for a tokenizer without a chat template)."""
    from hfpipe.data.sft_rows import convert_row

    row = {"instruction": instruction, "input": "", "output": ""}
    return convert_row(row, "instruction", chat=False, system_prompt=None)["prompt"]


def instruction_conversation(messages: list[dict[str, str]]) -> str:
    """A conversation in hfpipe's instruction layout, for a tokenizer without a chat template: a system message as a
    first paragraph, each user message as an '### Instruction:' prompt, each assistant reply after its prompt and
    followed by a blank line. Ends with the prompt of the last user message."""
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(instruction_prompt(message["content"]))
        else:
            parts.append(message["content"] + "\n\n")
    return "".join(parts)


def render_chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a model reads before its next reply to a conversation (role/content messages, the last one the
    user's): the chat template with its generation prompt, or without a template `instruction_conversation`."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return instruction_conversation(messages)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_format: str, system: str | None = None
) -> str:
    """The text the model reads for one prompt in a format of FORMATS (see the module docstring)."""
    if prompt_format == "raw":
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if prompt_format == "chat":
        return render_chat_prompt(tokenizer, messages)
    return instruction_conversation(messages)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, prompt_format: str) -> list[int]:
    """Token ids of a rendered prompt. Rendered chat templates carry their own special tokens (BOS), so nothing is
    added to them; raw and instruction prompts are tokenized as SFT tokenizes its prompts."""
    return tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"]


def pick_format(requested: str | None, tokenizer: PreTrainedTokenizerBase, model_dir: str) -> tuple[str, str]:
    """The prompt format to use and why (see the module docstring); 'chat' without a template is an error."""
    if requested == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            f"--format chat: {model_dir} has no chat template. Use --format instruction (hfpipe's SFT layout) or raw."
        )
    if requested is not None:
        return requested, "--format"
    if tokenizer.chat_template:
        return "chat", "the tokenizer's chat template"
    from hfpipe.rundir import stage_of
    from hfpipe.stages import STAGES

    stage = STAGES.get(stage_of(Path(model_dir).expanduser()) or "")
    if stage is not None and stage.instruction_layout:
        return "instruction", f"hfpipe {stage.name} run without a chat template"
    return "raw", "no chat template"


def context_length(model: PreTrainedModel) -> int | None:
    """Positions the model was built with (max_position_embeddings / n_positions), None when it has no limit."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, context: int | None, what: str = "the prompt") -> None:
    """Raise a ConfigError with the counts when prompt + new tokens exceed the model's context."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ConfigError(
            f"{what} is {prompt_tokens} tokens and --max-new-tokens is {max_new_tokens}, but the model's context "
            f"holds {context} positions: shorten the prompt to at most {max(context - max_new_tokens, 0)} tokens or "
            "lower --max-new-tokens."
        )
