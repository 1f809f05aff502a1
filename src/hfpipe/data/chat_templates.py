"""Chat templates: keep the tokenizer's, or attach a built-in / Jinja one, with an EOS that stops generation;
and the after-training check that the saved tokenizer renders what was trained on."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from hfpipe.errors import ConfigError

# ChatML with {% generation %} markers, so that TRL's assistant_only_loss can mask every non-assistant token.
CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILT_IN = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")}


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the chat template marks assistant tokens (needed for assistant-only loss on conversations)."""
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def check_template_name(name: str | None, where: str) -> None:
    """A chat_template value must be a built-in name or an existing .jinja file."""
    if name is None or name in BUILT_IN:
        return
    if not name.endswith(".jinja") or not Path(name).is_file():
        raise ConfigError(
            f"{where}: chat_template: '{name}' is neither a built-in template ({', '.join(BUILT_IN)}) nor an "
            "existing .jinja file."
        )


def apply_chat_template_choice(name: str | None, tokenizer: PreTrainedTokenizerBase) -> str:
    """Set the configured template on `tokenizer` (adding its special tokens); make sure EOS and pad exist.
    Returns a one-line description of the choice."""
    if name in BUILT_IN:
        template, special_tokens, eos = BUILT_IN[name]
        missing = [token for token in special_tokens if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = template
        tokenizer.eos_token = eos
        choice = f"built-in {name} template, EOS {eos!r}" + (f", added tokens {missing}" if missing else "")
    elif name is not None:
        tokenizer.chat_template = Path(name).read_text(encoding="utf-8")
        choice = f"template from {name}, EOS {tokenizer.eos_token!r}"
    elif tokenizer.chat_template:
        choice = f"the tokenizer's own chat template, EOS {tokenizer.eos_token!r}"
    else:
        choice = f"no chat template: the '### Instruction:' layout, EOS {tokenizer.eos_token!r}"
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has no EOS token, so generation could never stop; use another tokenizer.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # eos as pad: GPT-2 style tokenizers ship no pad token
    return choice


def fit_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model rows for added tokens and make its generation stop at the tokenizer's EOS."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # a scorer (sequence classification) has none
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def render_ids(tokenizer: PreTrainedTokenizerBase, row: dict) -> list[int]:
    """Token ids of one converted row (prompt + completion, or messages) as TRL tokenizes it for training."""
    if row.get("messages") is not None:
        return _ids(tokenizer.apply_chat_template(row["messages"]))
    if isinstance(row.get("prompt"), list):
        return _ids(tokenizer.apply_chat_template(row["prompt"] + row["completion"]))
    text = row["prompt"] + row["completion"] if row.get("prompt") is not None else row["text"]
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, row: dict) -> list[int]:
    """Token ids of the part of a converted row the loss does not cover under completion-only loss: the prompt
    (for conversations, every turn before the last, with the generation prompt); none for plain text."""
    if row.get("messages") is not None:
        return _ids(tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True))
    if isinstance(row.get("prompt"), list):
        return _ids(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True))
    if row.get("prompt") is not None:
        return tokenizer(row["prompt"])["input_ids"]
    return []


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def check_saved_model(output_dir: Path, row: dict, trained_ids: list[int]) -> list[str]:
    """Reload the saved tokenizer and generation config; return problems (empty when the saved files render the
    training row exactly and generation stops at the EOS)."""
    problems = []
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rendered = render_ids(tokenizer, row)
    if rendered[: len(trained_ids)] != list(trained_ids):  # training may have truncated at max_length
        problems.append("the saved tokenizer renders the first training row differently from training")
    try:
        eos_ids = GenerationConfig.from_pretrained(output_dir).eos_token_id
    except OSError:
        eos_ids = None
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if tokenizer.eos_token_id not in eos_ids:
        problems.append(
            f"generation_config.json does not stop at the tokenizer's EOS {tokenizer.eos_token!r} "
            f"(eos_token_id {eos_ids})"
        )
    return problems
