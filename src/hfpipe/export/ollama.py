"""The Ollama Modelfile of an exported GGUF file: FROM the file, a TEMPLATE (Go template syntax) that lays out a
conversation exactly as the model was trained (its chat template, or hfpipe's '### Instruction:' layout), a
PARAMETER stop for each stop token and the context the model was trained with.

A Jinja chat template cannot be translated in general, so it is measured instead: rendered on conversations whose
contents are markers, it gives the text each role's message is wrapped in, the text before a first message that is
not a system one (a default system prompt) and the generation prompt. The layout made of those pieces must then
reproduce the template on every probe conversation, or the export stops naming the template as unsupported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from hfpipe.errors import ConfigError
from hfpipe.tools.prompts import instruction_conversation

Messages = list[dict[str, str]]
Render = Callable[[Messages, bool], str]  # (messages, add_generation_prompt) -> text
ROLES = ("system", "user", "assistant")
RAW_TEMPLATE = "{{ .Prompt }}"  # a model trained on plain text continues the prompt as given


def _message(role: str, number: int) -> dict[str, str]:
    # Letters and digits only, so that no template escapes, strips or splits them.
    return {"role": role, "content": f"hfpipeMarker{role.capitalize()}{number}"}


S1, U1, A1, U2, A2, U3 = (
    _message("system", 1),
    _message("user", 1),
    _message("assistant", 1),
    _message("user", 2),
    _message("assistant", 2),
    _message("user", 3),
)


@dataclass(frozen=True)
class Layout:
    """A conversation laid out message by message: each role's content wrapped in fixed text, `opening` before a
    first message that is not a system one, `generation_prompt` after a last message that is not the assistant's."""

    wraps: dict[str, tuple[str, str]]  # role -> (text before its content, text after it)
    opening: str = ""
    generation_prompt: str = ""

    def render(self, messages: Messages) -> str:
        """The text the layout gives `messages` (what the Modelfile's TEMPLATE renders)."""
        parts = [] if messages and messages[0]["role"] == "system" else [self.opening]
        for message in messages:
            if message["role"] in self.wraps:
                before, after = self.wraps[message["role"]]
                parts += [before, message["content"], after]
        if messages and messages[-1]["role"] != "assistant":
            parts.append(self.generation_prompt)
        return "".join(parts)


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ValueError(f"{what} does not show a message's content exactly once")
    before, after = text.split(marker)
    return before, after


def _between(text: str, first: str, second: str) -> str:
    start = text.find(first) + len(first)
    end = text.find(second, start)
    if start < len(first) or end < 0:
        raise ValueError("a message's content is missing from the rendered conversation")
    return text[start:end]


def measure_layout(render: Render) -> Layout:
    """The Layout that reproduces `render` on conversations of system (when it takes one), user and assistant
    messages; ValueError when no such layout does."""
    head, after_user = _split(render([U1], False), U1["content"], "a one-message conversation")
    two = render([U1, A1], False)
    joint = _between(two, U1["content"], A1["content"])
    if not joint.startswith(after_user):
        raise ValueError("the text after a user message depends on what follows it")
    before_assistant = joint[len(after_user) :]
    after_assistant = two.split(A1["content"], 1)[1]
    joint = _between(render([U1, A1, U2], False), A1["content"], U2["content"])
    if not joint.startswith(after_assistant):
        raise ValueError("the text after an assistant message depends on what follows it")
    before_user = joint[len(after_assistant) :]
    if not head.endswith(before_user):
        raise ValueError("the first user message is laid out unlike the others")
    prompt_only = render([U1], False)
    with_prompt = render([U1], True)
    if not with_prompt.startswith(prompt_only):
        raise ValueError("the generation prompt changes the conversation before it")
    wraps = {"user": (before_user, after_user), "assistant": (before_assistant, after_assistant)}
    system = _system_wrap(render, before_user)
    if system is not None:
        wraps["system"] = system
    layout = Layout(wraps, head[: len(head) - len(before_user)], with_prompt[len(prompt_only) :])
    probes = [[U1], [U1, A1], [U1, A1, U2], [U1, A1, U2, A2], [U1, A1, U2, A2, U3]]
    if system is not None:
        probes += [[S1, U1], [S1, U1, A1], [S1, U1, A1, U2], [S1, U1, A1, U2, A2, U3]]
    for probe in probes:
        if layout.render(probe) != render(probe, probe[-1]["role"] != "assistant"):
            raise ValueError(f"a {len(probe)}-message conversation is laid out unlike its messages one by one")
    return layout


def _system_wrap(render: Render, before_user: str) -> tuple[str, str] | None:
    """The text around a system message, None when the template takes none (raises, or leaves it out)."""
    try:
        text = render([S1, U1], False)
    except TemplateError:  # the template refuses system messages
        return None
    if text.count(S1["content"]) != 1:
        return None
    before, rest = text.split(S1["content"])
    joint = rest.split(U1["content"], 1)[0]
    if not joint.endswith(before_user):
        raise ValueError("the text after a system message depends on what follows it")
    return before, joint[: len(joint) - len(before_user)]


def conversation_render(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> Render | None:
    """How the model lays out a conversation in `prompt_format`: its chat template, hfpipe's instruction layout
    (whose user turns end in the response header), or None for a raw-text model."""
    if prompt_format == "chat":
        return lambda messages, prompt: tokenizer.apply_chat_template(
            messages, add_generation_prompt=prompt, tokenize=False
        )
    if prompt_format == "instruction":
        return lambda messages, prompt: instruction_conversation(messages)
    return None


def _literal(text: str) -> str:
    # "{{" would open an action: emit it as a Go string instead.
    return text.replace("{{", '{{ "{{" }}')


def go_template(layout: Layout | None) -> str:
    """The Modelfile TEMPLATE (Go text/template over Ollama's .Messages) that renders like `layout`."""
    if layout is None:
        return RAW_TEMPLATE
    branches = []
    for role in ROLES:
        if role in layout.wraps:
            before, after = layout.wraps[role]
            branches.append(f'eq $m.Role "{role}" }}}}{_literal(before)}{{{{ $m.Content }}}}{_literal(after)}')
    parts = ["{{ range $i, $m := .Messages }}"]
    if layout.generation_prompt:
        parts.append("{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if layout.opening:
        parts.append(f'{{{{ if and (eq $i 0) (ne $m.Role "system") }}}}{_literal(layout.opening)}{{{{ end }}}}')
    parts.append("{{ if " + "{{ else if ".join(branches) + "{{ end }}")
    if layout.generation_prompt:
        parts.append(
            f'{{{{ if and $last (ne $m.Role "assistant") }}}}{_literal(layout.generation_prompt)}{{{{ end }}}}'
        )
    parts.append("{{ end }}")
    return "".join(parts)


def model_template(tokenizer: PreTrainedTokenizerBase, prompt_format: str, where: str) -> str:
    """The Modelfile TEMPLATE for a model whose prompts are in `prompt_format`; one line when its chat template is
    not one a Go template can reproduce."""
    render = conversation_render(tokenizer, prompt_format)
    if render is None:
        return RAW_TEMPLATE
    try:
        layout = measure_layout(render)
    except (ValueError, TemplateError) as error:
        raise ConfigError(
            f"{where}: the chat template cannot be written as an Ollama TEMPLATE ({error}); only templates that "
            "wrap each message in fixed text per role are supported."
        ) from None
    template = go_template(layout)
    if '"""' in template:
        raise ConfigError(f'{where}: the chat template holds """, which a Modelfile TEMPLATE cannot quote.')
    return template


def modelfile(gguf_name: str, template: str, stop_tokens: list[str], context: int | None) -> str:
    """The Modelfile text: FROM ./`gguf_name`, TEMPLATE, a PARAMETER stop per stop token, num_ctx = `context`."""
    lines = [
        "# Written by hfpipe export. Create the Ollama model with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stop_tokens),
    ]
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"
