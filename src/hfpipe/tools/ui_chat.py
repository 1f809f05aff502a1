"""Chat for `hfpipe ui`: finished runs loaded on first use (the most recent few kept), answers decoded as
`hfpipe chat` decodes them, one generation at a time per model."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from hfpipe.errors import ConfigError
from hfpipe.rundir import stage_of
from hfpipe.stages import STAGES
from hfpipe.tools.chat import ChatSession, Settings, trim_history
from hfpipe.tools.decoding import check_sampling_values, default_max_new_tokens
from hfpipe.tools.prompts import context_length
from hfpipe.tools.ui_runs import RunRef, status_of

KEPT_MODELS = 2  # two runs side by side stay loaded


class ChatRequest(BaseModel):
    """One chat turn: the conversation so far (ending with the user's message) and the decoding knobs of
    `hfpipe chat` (temperature 0: greedy)."""

    messages: list[dict[str, str]]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    system: str | None = None

    def check(self) -> None:
        """Refuse bad knobs and a conversation that does not end with a user message, in one line."""
        check_sampling_values(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_new_tokens,
            name=lambda field: field,
            zero_temperature_greedy=True,
        )
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ConfigError("messages: the conversation must end with a user message.")
        for index, message in enumerate(self.messages):
            if message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
                raise ConfigError(f"messages[{index}]: expected {{role: user|assistant, content: text}}.")


@dataclass
class ModelPool:
    """Loaded runs by name, the least recently used dropped beyond KEPT_MODELS."""

    dtype: str | None = None
    device: str | None = None
    trust_remote_code: bool = False
    loaded: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def get(self, run: RunRef) -> tuple[Any, threading.Lock]:
        """The run's LoadedModel (loading it the first time) and the lock its generations take."""
        from hfpipe.models.trained import load_for_inference

        check_chattable(run)
        with self.guard:
            lock = self.locks.setdefault(run.name, threading.Lock())
        with lock:
            if run.name not in self.loaded:
                self.loaded[run.name] = load_for_inference(
                    str(run.path), self.dtype, self.device, self.trust_remote_code
                )
            with self.guard:
                self.loaded.move_to_end(run.name)
                while len(self.loaded) > KEPT_MODELS:
                    self.loaded.popitem(last=False)
                return self.loaded[run.name], lock


def check_chattable(run: RunRef) -> None:
    """Refuse, in one line, a run that is not finished or whose stage does not generate."""
    stage = STAGES[stage_of(run.path) or ""]
    if not stage.generates:
        raise ConfigError(f"{run.name}: a {stage.name} run scores text; it does not generate. Pick another run.")
    status = status_of(run.path)
    if status != "finished":
        raise ConfigError(f"{run.name}: the run is {status}; chat needs a finished run.")


def answer(pool: ModelPool, run: RunRef, request: ChatRequest) -> dict[str, Any]:
    """The run's answer to the conversation, decoded as `hfpipe chat` would with the same settings: {answer,
    decoding, dropped (oldest messages left out to fit the context), prompt_tokens}."""
    from transformers import set_seed

    from hfpipe.tools.decoding import generate_ids

    request.check()
    loaded, lock = pool.get(run)
    context = context_length(loaded.model)
    settings = Settings(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        max_new_tokens=request.max_new_tokens or default_max_new_tokens(context),
        repetition_penalty=request.repetition_penalty,
    )
    session = ChatSession(loaded, settings, request.system)
    history, dropped = trim_history(request.messages, session.fits)
    if not session.fits(history):
        raise ConfigError(
            f"{run.name}: the message does not fit the model's context of {context} positions with room for "
            f"{settings.max_new_tokens} new tokens; shorten it or lower max_new_tokens."
        )
    prompt = session.prompt_ids(history)
    with lock:
        if request.seed is not None:
            set_seed(request.seed)
        ids = generate_ids(loaded.model, prompt, session.generation_config())
    text = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return {"answer": text, "decoding": settings.describe(), "dropped": dropped, "prompt_tokens": len(prompt)}
