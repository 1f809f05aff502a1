"""`hfpipe chat`: commands and their bad values, history trimming, answers equal to greedy model.generate, and
a real terminal session in tmux."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from argparse import Namespace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfpipe.models.trained import load_for_inference
from hfpipe.tools.chat import ChatSession, Settings, chat_loop, handle_command, initial_settings, trim_history


def settings() -> Settings:
    return Settings(temperature=0.0, top_k=None, top_p=None, max_new_tokens=16)


@pytest.mark.parametrize(
    ("line", "changed"),
    [
        ("/temp 0.7", {"temperature": 0.7}),
        ("/TEMP  1.5 ", {"temperature": 1.5}),
        ("/temp 0", {"temperature": 0.0}),
        ("/topk 40", {"top_k": 40}),
        ("/topk 0", {"top_k": 0}),
        ("/topp 0.9", {"top_p": 0.9}),
        ("/topp 1", {"top_p": 1.0}),
        ("/tokens 63", {"max_new_tokens": 63}),
    ],
)
def test_commands_set_values(line: str, changed: dict) -> None:
    current = settings()
    result = handle_command(line, current, context=64)
    assert result.action is None and result.message
    assert vars(current) == {**vars(settings()), **changed}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/temp abc", "/temp needs a number, e.g. /temp 0.7."),
        ("/temp -1", "/temp -1: must be 0 (greedy) or more."),
        ("/temp nan", "/temp nan: must be a finite number."),
        ("/temp", "/temp needs a value: /temp X."),
        ("/topk 1.5", "/topk needs a whole number, e.g. /topk 40."),
        ("/topk -3", "/topk -3: must be 0 (no top-k filter) or more."),
        ("/topp 0", "/topp 0.0: must be greater than 0 and at most 1."),
        ("/topp 1.5", "/topp 1.5: must be greater than 0 and at most 1."),
        ("/tokens 0", "/tokens 0: must be greater than 0."),
        ("/tokens 64", "/tokens 64: the model's context holds 64 positions; use fewer."),
        ("/reset now", "/reset takes no value."),
        ("/tempo 1", "unknown command /tempo; /help lists the commands."),
    ],
)
def test_bad_commands_leave_the_settings_alone(line: str, message: str) -> None:
    current = settings()
    result = handle_command(line, current, context=64)
    assert (result.message, result.action) == (message, None)
    assert vars(current) == vars(settings())


def test_actions_and_help() -> None:
    for name in ("reset", "info", "quit"):
        assert handle_command(f"/{name}", settings(), None).action == name
    help_text = handle_command("/help", settings(), None).message
    for command in ("/temp", "/topk", "/topp", "/tokens", "/reset", "/info", "/help", "/quit"):
        assert f"  {command} " in help_text
    assert "applies once sampling is on" in handle_command("/topk 5", settings(), None).message


def test_trimming_drops_whole_exchanges_from_the_oldest() -> None:
    history = [
        {"role": "user", "content": "a" * 10},
        {"role": "assistant", "content": "b" * 10},
        {"role": "user", "content": "c" * 10},
        {"role": "assistant", "content": "d" * 10},
        {"role": "user", "content": "e" * 10},
    ]
    size = lambda messages: sum(len(m["content"]) for m in messages)  # noqa: E731
    assert trim_history(history, lambda m: size(m) <= 50) == (history, 0)
    assert trim_history(history, lambda m: size(m) <= 40) == (history[2:], 2)
    assert trim_history(history, lambda m: size(m) <= 29) == (history[4:], 4)
    assert trim_history(history, lambda m: size(m) <= 5) == (history[4:], 4)  # the new message always stays


def test_initial_settings_start_from_the_models_own(tiny_gpt2_dir: Path) -> None:
    from transformers import GenerationConfig

    flags = Namespace(temperature=None, top_k=None, top_p=None, max_new_tokens=None, repetition_penalty=None)
    greedy = initial_settings(GenerationConfig(), flags, context=64)
    assert (greedy.temperature, greedy.max_new_tokens) == (0.0, 32)
    own = GenerationConfig(do_sample=True, temperature=0.2, top_p=0.9)
    sampled = initial_settings(own, flags, context=None)
    assert (sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (0.2, 0.9, 128)
    flags.temperature, flags.max_new_tokens = 0.0, 8
    assert vars(initial_settings(own, flags, context=64)) == {
        "temperature": 0.0,
        "top_k": None,
        "top_p": 0.9,
        "max_new_tokens": 8,
        "repetition_penalty": None,
    }


def greedy_answer(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def long_context_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with 256 positions: room for a few turns in the instruction layout (41 tokens a prompt)."""
    import torch

    from hfpipe.models.gpt2 import build_gpt2

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = build_gpt2({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 256}, 0.0, tokenizer)
    directory = tmp_path_factory.mktemp("long-context")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_session_answers_keeps_history_and_trims_it(long_context_dir: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = long_context_dir
    session = ChatSession(load_for_inference(str(model_dir)), settings())
    session.settings.max_new_tokens = 4
    first = session.reply("Who is Lear?")
    layout = "### Instruction:\nWho is Lear?\n\n### Response:\n"
    assert first == greedy_answer(model_dir, layout, 4)
    assert capsys.readouterr().out.strip() == first  # streamed as it came
    second = session.reply("And the fool?")
    conversation = f"{layout}{first}\n\n### Instruction:\nAnd the fool?\n\n### Response:\n"
    assert second == greedy_answer(model_dir, conversation, 4)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.settings.max_new_tokens = 150  # of 256 positions: the first exchange no longer fits
    session.reply("What of Goneril?")
    assert "[context full: dropped the 2 oldest messages]" in capsys.readouterr().out
    assert [m["content"] for m in session.history[::2]] == ["And the fool?", "What of Goneril?"]
    kept = list(session.history)
    assert session.reply(" ".join(["the king and the queen"] * 30)) is None
    assert "your message renders to" in capsys.readouterr().out and session.history == kept


def test_loop_runs_commands_and_quits_on_eof(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    session = ChatSession(load_for_inference(str(tiny_gpt2_dir)), settings())
    lines = iter(["Who is Lear?", "/topp 7", "/info", "/reset", "/info", "/quit", "never read"])
    chat_loop(session, read=lambda prompt: next(lines))
    out = capsys.readouterr().out
    assert "/topp 7.0: must be greater than 0 and at most 1." in out
    assert (
        "conversation: 1 exchange, " in out and "conversation forgotten" in out and "conversation: 0 exchanges" in out
    )
    assert next(lines) == "never read"
    session.history = []
    chat_loop(session, read=lambda prompt: (_ for _ in ()).throw(EOFError))  # Ctrl-D ends the loop


@pytest.fixture
def outputs_with_a_templated_run(tiny_gpt2_dir: Path, tmp_path: Path) -> Path:
    """A working dir whose outputs/ holds one finished SFT run: the tiny GPT-2 with the chatml template."""
    from hfpipe.data.chat_templates import apply_chat_template_choice, fit_model_to_tokenizer

    run = tmp_path / "outputs" / "tiny-sft"
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    apply_chat_template_choice("chatml", tokenizer)
    fit_model_to_tokenizer(model, tokenizer)
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text("# accelerate launch recipes/sft.py --config sft.yaml\nmax_steps: 2\n")
    (run / "metrics.json").write_text(json.dumps({"global_step": 2}))
    return tmp_path


class Terminal:
    """A tmux session on a private server, driven by keys and read from its screen."""

    def __init__(self, command: str, cwd: Path) -> None:
        self.socket = f"hfpipe-test-{uuid.uuid4().hex[:8]}"
        self.tmux(
            "new-session",
            "-d",
            "-s",
            "chat",
            "-x",
            "200",
            "-y",
            "50",
            "-c",
            str(cwd),
            f"{command}; echo CHAT-EXIT=$?; sleep 60",
        )

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "chat", "-S", "-500")

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if len(re.findall(pattern, screen)) >= count:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} x{count} not on screen after {timeout}s:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_in_a_real_terminal(outputs_with_a_templated_run: Path) -> None:
    environment = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HFPIPE_CACHE": os.environ["HFPIPE_CACHE"],
    }
    exports = " ".join(f"{key}={value!s}" for key, value in environment.items())
    terminal = Terminal(
        f"env {exports} {sys.executable} -m hfpipe.cli chat --max-new-tokens 6", outputs_with_a_templated_run
    )
    try:
        screen = terminal.wait_for(r"/help lists the commands")
        assert "no model named: picked outputs/tiny-sft, the newest finished sft run under outputs/" in screen
        assert "format: chat (chat template)" in screen and "decoding: greedy, at most 6 new tokens" in screen
        terminal.wait_for(r"you>")  # the pane drops trailing spaces
        terminal.send("Who is Lear?", "Enter")
        terminal.wait_for(r"you>", count=2)
        terminal.send("/temp abc", "Enter")
        terminal.wait_for(r"/temp needs a number, e.g. /temp 0.7.")
        terminal.send("/temp 0.5", "Enter")
        terminal.wait_for(r"sampling at temperature 0.5")
        terminal.send("/info", "Enter")
        screen = terminal.wait_for(r"conversation: 1 exchange, \d+ tokens of 64 context")
        assert "decoding: sampling: temperature 0.5" in screen
        terminal.send("/reset", "Enter")
        terminal.wait_for(r"conversation forgotten")
        terminal.send("/info", "Enter")
        terminal.wait_for(r"conversation: 0 exchanges, 0 tokens of 64 context")
        terminal.send("C-d")
        screen = terminal.wait_for(r"CHAT-EXIT=\d+")
        assert "CHAT-EXIT=0" in screen and "Traceback" not in screen
    finally:
        terminal.close()
