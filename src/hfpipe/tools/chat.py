"""Chat with a model in the terminal: several turns, the conversation kept, answers streamed.

  hfpipe chat outputs/quickstart/sft
  hfpipe chat              # the newest finished run under outputs/ (DPO before SFT before pretrain)

Turns are rendered with the tokenizer's chat template. A model without one gets hfpipe's instruction layout with
the conversation folded in: each earlier exchange as its '### Instruction:' prompt followed by the answer and a
blank line, then the prompt of the new message. When the conversation no longer fits the model's context with room
for the answer, the oldest exchanges are dropped (and the chat says so).

Decoding starts from the model's generation_config.json (greedy unless it says to sample) and the flags, and
changes with commands:

  /temp X     temperature: 0 for greedy, more than 0 to sample
  /topk N     top-k when sampling (0: no top-k filter)
  /topp X     top-p when sampling, in (0, 1]
  /tokens N   at most N new tokens per answer
  /reset      forget the conversation
  /info       the model, the settings and how much of the context the conversation fills
  /help       this list
  /quit       leave (Ctrl-D too); Ctrl-C stops an answer
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hfpipe.errors import ConfigError
from hfpipe.rundir import model_or_latest_run
from hfpipe.tools.decoding import build_generation_config, check_sampling_values, default_max_new_tokens, generate_ids
from hfpipe.tools.model_flags import add_decoding_flags, add_model_argument, add_model_flags
from hfpipe.tools.prompts import context_length, encode_prompt, render_chat_prompt

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from hfpipe.models.trained import LoadedModel

COMMANDS = {
    "/temp": "X     temperature: 0 for greedy, more than 0 to sample",
    "/topk": "N     top-k when sampling (0: no top-k filter)",
    "/topp": "X     top-p when sampling, in (0, 1]",
    "/tokens": "N   at most N new tokens per answer",
    "/reset": "      forget the conversation",
    "/info": "       the model, the settings and how much of the context the conversation fills",
    "/help": "       this list",
    "/quit": "       leave (Ctrl-D too); Ctrl-C stops an answer",
}
HELP = "\n".join(f"  {name} {text}" for name, text in COMMANDS.items())


@dataclass
class Settings:
    """Decoding settings a chat changes with its commands; temperature 0 means greedy decoding."""

    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int
    repetition_penalty: float | None = None

    def describe(self) -> str:
        """One line, e.g. 'sampling: temperature 0.7, top-k 50, top-p 0.9, at most 64 new tokens'."""
        if self.temperature == 0:
            text = "greedy"
        else:
            text = f"sampling: temperature {self.temperature}, top-k {self.top_k if self.top_k is not None else 50}"
            text += f", top-p {self.top_p if self.top_p is not None else 1.0}"
        if self.repetition_penalty not in (None, 1.0):
            text += f", repetition penalty {self.repetition_penalty}"
        return f"{text}, at most {self.max_new_tokens} new tokens"


@dataclass
class CommandResult:
    """What a command line asks: a message to print, and an action for the chat ('quit', 'reset', 'info')."""

    message: str = ""
    action: str | None = None


def _number(text: str, kind: type, usage: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(
            f"{usage} needs {'a whole number' if kind is int else 'a number'}, e.g. {usage} "
            f"{'40' if kind is int else '0.7'}."
        ) from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{usage} {text}: must be a finite number.")
    return value


def _set_value(name: str, text: str, settings: Settings, context: int | None) -> str:
    """Apply one '/name value' command to `settings`; return what changed. Raises ConfigError for a bad value."""
    if name == "/temp":
        value = _number(text, float, name)
        if value < 0:
            raise ConfigError(f"/temp {text}: must be 0 (greedy) or more.")
        settings.temperature = value
        return "greedy decoding" if value == 0 else f"sampling at temperature {value}"
    if name == "/topk":
        value = _number(text, int, name)
        check_sampling_values(top_k=value, name=lambda _: name)
        settings.top_k = value
        message = f"top-k {value}"
    elif name == "/topp":
        value = _number(text, float, name)
        check_sampling_values(top_p=value, name=lambda _: name)
        settings.top_p = value
        message = f"top-p {value}"
    else:
        value = _number(text, int, name)
        check_sampling_values(max_new_tokens=value, name=lambda _: name)
        if context is not None and value >= context:
            raise ConfigError(f"/tokens {value}: the model's context holds {context} positions; use fewer.")
        settings.max_new_tokens = value
        return f"at most {value} new tokens per answer"
    return message + (" (applies once sampling is on: /temp X)" if settings.temperature == 0 else "")


def handle_command(line: str, settings: Settings, context: int | None) -> CommandResult:
    """Run one command line ('/temp 0.7', '/reset', ...) against `settings`. A bad command or value never raises:
    it comes back as a one-line message and the settings stay as they were."""
    name, _, rest = line.strip().partition(" ")
    name, rest = name.lower(), rest.strip()
    if name not in COMMANDS:
        return CommandResult(f"unknown command {name}; /help lists the commands.")
    if name in ("/temp", "/topk", "/topp", "/tokens"):
        if not rest:
            return CommandResult(f"{name} needs a value: {name} {COMMANDS[name].split()[0]}.")
        try:
            return CommandResult(_set_value(name, rest, settings, context))
        except ConfigError as error:  # the value is checked before it is set: the settings are unchanged
            return CommandResult(str(error))
    if rest:
        return CommandResult(f"{name} takes no value.")
    if name == "/help":
        return CommandResult(HELP)
    return CommandResult(action=name[1:])


def trim_history(history: list[dict[str, str]], fits: Callable[[list[dict[str, str]]], bool]) -> tuple[list, int]:
    """Drop the oldest exchanges (a user message and the replies to it) until `fits(history)` or only the last user
    message is left; return the kept history and the number of messages dropped."""
    kept = list(history)
    while not fits(kept) and len(kept) > 1:
        kept.pop(0)
        while len(kept) > 1 and kept[0]["role"] != "user":
            kept.pop(0)
    return kept, len(history) - len(kept)


@dataclass
class ChatSession:
    """A loaded model, its decoding settings and the conversation so far."""

    loaded: LoadedModel
    settings: Settings
    system: str | None = None
    picked: str = ""  # how the model was chosen, for /info
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def context(self) -> int | None:
        """Positions the model was built with."""
        return context_length(self.loaded.model)

    @property
    def prompt_format(self) -> str:
        """'chat' with the tokenizer's template, 'instruction' without one."""
        return "chat" if self.loaded.tokenizer.chat_template else "instruction"

    def prompt_ids(self, history: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation rendered for the model's next reply."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        return encode_prompt(
            self.loaded.tokenizer, render_chat_prompt(self.loaded.tokenizer, messages), self.prompt_format
        )

    def fits(self, history: list[dict[str, str]]) -> bool:
        """True when the rendered conversation leaves room for an answer of max_new_tokens in the context."""
        context = self.context
        return context is None or len(self.prompt_ids(history)) + self.settings.max_new_tokens <= context

    def generation_config(self) -> GenerationConfig:
        """The model's generation config with the chat's settings on top."""
        settings = self.settings
        sampling = settings.temperature > 0
        return build_generation_config(
            self.loaded.model,
            self.loaded.tokenizer,
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_k=settings.top_k if sampling else None,
            top_p=settings.top_p if sampling else None,
            repetition_penalty=settings.repetition_penalty,
        )

    def reply(self, text: str) -> str | None:
        """Answer a user message, streaming the answer to stdout; keep both in the history. Returns the answer, or
        None (after printing why) when the message alone does not fit the context."""
        history, dropped = trim_history([*self.history, {"role": "user", "content": text}], self.fits)
        if not self.fits(history):
            length = len(self.prompt_ids(history))
            print(
                f"[your message renders to {length} tokens; with /tokens {self.settings.max_new_tokens} the "
                f"context of {self.context} positions holds {self.context - self.settings.max_new_tokens}: shorten it "
                "or lower /tokens]"
            )
            return None
        if dropped:
            print(f"[context full: dropped the {dropped} oldest messages]")
        streamer, pieces = collecting_streamer(self.loaded.tokenizer)
        try:
            generate_ids(self.loaded.model, self.prompt_ids(history), self.generation_config(), streamer)
        except KeyboardInterrupt:
            print(" [stopped]")
        answer = "".join(pieces).strip()
        self.history = [*history, {"role": "assistant", "content": answer}]
        return answer

    def info(self) -> str:
        """The model, the prompt format, the settings and the conversation's share of the context."""
        loaded = self.loaded
        source = f"{loaded.path} (adapter on {loaded.base})" if loaded.base else loaded.path
        used = len(self.prompt_ids(self.history)) if self.history else 0
        exchanges = sum(message["role"] == "user" for message in self.history)
        context = self.context
        lines = [
            f"model: {source}{f' ({self.picked})' if self.picked else ''}",
            f"format: {self.prompt_format} ({'chat template' if self.prompt_format == 'chat' else 'no chat template'})",
            f"decoding: {self.settings.describe()}",
            f"conversation: {exchanges} exchange{'' if exchanges == 1 else 's'}, {used} tokens of "
            f"{context if context is not None else 'an unlimited'} context",
        ]
        if self.system:
            lines.append(f"system: {self.system}")
        return "\n".join(lines)


def collecting_streamer(tokenizer: Any) -> tuple[Any, list[str]]:
    """A TextStreamer printing the answer only (special tokens left out), and the list it appends each printed
    piece to: the answer so far, even when Ctrl-C stops it."""
    from transformers import TextStreamer

    pieces: list[str] = []

    class CollectingStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)
            super().on_finalized_text(text, stream_end)

    return CollectingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), pieces


def initial_settings(
    generation_config: GenerationConfig | None, args: argparse.Namespace, context: int | None
) -> Settings:
    """The model's own decoding settings (greedy unless its generation_config samples) with the flags on top."""
    own = generation_config
    sampling = bool(own is not None and own.do_sample)
    temperature = (own.temperature or 1.0) if sampling else 0.0
    settings = Settings(
        temperature=temperature if args.temperature is None else args.temperature,
        top_k=args.top_k if args.top_k is not None else (own.top_k if own is not None else None),
        top_p=args.top_p if args.top_p is not None else (own.top_p if own is not None else None),
        max_new_tokens=args.max_new_tokens or default_max_new_tokens(context),
        repetition_penalty=args.repetition_penalty,
    )
    if context is not None and settings.max_new_tokens >= context:
        raise ConfigError(
            f"--max-new-tokens {settings.max_new_tokens}: the model's context holds {context} positions; use fewer."
        )
    return settings


def check_args(args: argparse.Namespace) -> None:
    """Validate the flags before any model is loaded."""
    check_sampling_values(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        zero_temperature_greedy=True,
    )


def chat_loop(session: ChatSession, read: Callable[[str], str] = input) -> None:
    """Read messages and commands until /quit or end of input."""
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)")
            continue
        if not line.strip():
            continue
        if not line.startswith("/"):
            session.reply(line)
            continue
        result = handle_command(line, session.settings, session.context)
        if result.action == "quit":
            return
        if result.action == "reset":
            session.history = []
            result.message = "conversation forgotten"
        elif result.action == "info":
            result.message = session.info()
        print(result.message, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe chat`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_argument(parser, optional=True)
    parser.add_argument("--system", help="a system message that starts the conversation")
    add_decoding_flags(
        parser,
        zero_temperature_greedy=True,
        seed_help="seed once at the start, for a reproducible session",
        per="per answer",
    )
    add_model_flags(parser)


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe chat`."""
    from transformers import set_seed
    from transformers.utils import logging

    from hfpipe.models.trained import load_for_inference

    check_args(args)
    name, picked = model_or_latest_run(args.model)
    if picked:
        print(f"no model named: picked {name}, {picked}")
    logging.disable_progress_bar()
    loaded = load_for_inference(name, args.dtype, args.device, args.trust_remote_code)
    settings = initial_settings(loaded.model.generation_config, args, context_length(loaded.model))
    session = ChatSession(loaded, settings, args.system, picked)
    if args.seed is not None:
        set_seed(args.seed)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 (line editing and history for input())
    print(session.info())
    print("/help lists the commands; /quit or Ctrl-D leaves.", flush=True)
    chat_loop(session)
