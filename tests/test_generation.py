"""`hfpipe generate`: flags checked before loading, greedy equal to model.generate, seeded sampling, formats,
--compare, --base, --next-token, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hfpipe.cli import main as hfpipe_main
from hfpipe.tools.decoding import build_generation_config, check_sampling_values
from hfpipe.tools.generate import COMPARE_STRATEGIES, read_prompts, side_by_side
from hfpipe.tools.prompts import instruction_conversation, pick_format, render_chat_prompt, render_prompt

PROMPT = "the king shall"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_gpt2_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def chatml_dir(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with the built-in chatml template (tokens added, EOS <|im_end|>), as SFT leaves it."""
    from hfpipe.data.chat_templates import apply_chat_template_choice, fit_model_to_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    apply_chat_template_choice("chatml", tokenizer)
    fit_model_to_tokenizer(model, tokenizer)
    directory = tmp_path_factory.mktemp("chatml")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tuned_dir(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny GPT-2 with shifted weights and the record of an hfpipe SFT run (no chat template)."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    directory = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(directory)
    (directory / "config.yaml").write_text("# accelerate launch recipes/sft.py --config x.yaml\nmax_steps: 2\n")
    return directory


def generate(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """Run `hfpipe generate` in-process; return stdout and stderr."""
    hfpipe_main(["generate", *argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `hfpipe generate` expecting a user error; return its one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        hfpipe_main(["generate", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def plain_generate(model, tokenizer, prompt: str, seed: int | None = None, **settings) -> str:
    """The continuation model.generate writes after `prompt`, called directly."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if seed is not None:
        set_seed(seed)
    output = model.generate(ids, pad_token_id=tokenizer.pad_token_id, **settings)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--top-p", "1.5"], "--top-p 1.5: must be greater than 0 and at most 1."),
        (["--top-p", "nan"], "--top-p nan: must be greater than 0 and at most 1."),
        (["--temperature", "0"], "--temperature 0.0: must be greater than 0"),
        (["--top-k", "-1"], "--top-k -1: must be 0 (no top-k filter) or more."),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be greater than 0."),
        (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be greater than 0"),
        (["--next-token", "0"], "--next-token 0: must be greater than 0."),
        (["--compare", "--next-token", "3"], "--compare and --next-token cannot be combined"),
        ([], "no prompt: give --prompt TEXT"),
    ],
)
def test_bad_flags_stop_before_the_model_is_loaded(
    flags: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompt = [] if not flags else ["--prompt", PROMPT]
    # The model dir does not exist: the flag's error coming first shows nothing was loaded.
    err = error_of([str(tmp_path / "missing"), *prompt, *flags], capsys)
    assert expected in err


def test_the_console_command_exits_2_with_one_line(tiny_gpt2_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hfpipe.cli", "generate", str(tiny_gpt2_dir), "--prompt", "x", "--top-p", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "error: --top-p 1.5: must be greater than 0 and at most 1.\n"
    assert result.stdout == ""


def test_check_sampling_values_names_fields_as_told() -> None:
    check_sampling_values(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.1, max_new_tokens=1)
    with pytest.raises(Exception, match=r"^top_p 0: must be greater than 0"):
        check_sampling_values(top_p=0, name=lambda field: field)


def test_missing_model_and_missing_adapter_base_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = error_of([str(tmp_path / "nowhere"), "--prompt", PROMPT], capsys)
    assert "no such model directory" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    err = error_of([str(adapter), "--prompt", PROMPT], capsys)
    assert "the adapter's base model" in err and "is not a directory" in err


def test_greedy_streams_what_model_generate_writes(
    tiny_gpt2_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    model, tokenizer = model_and_tokenizer
    out, err = generate([str(tiny_gpt2_dir), "--prompt", PROMPT, "--max-new-tokens", "12"], capsys)
    expected = plain_generate(model, tokenizer, PROMPT, max_new_tokens=12, do_sample=False)
    assert out == PROMPT + expected + "\n"  # a raw prompt is printed before its continuation
    assert "format: raw (no chat template)" in err and "greedy, at most 12 new tokens" in err


def test_several_prompts_are_each_generated_greedily(
    tiny_gpt2_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [PROMPT, "my lady doth"]
    argv = [str(tiny_gpt2_dir), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6"]
    out, _ = generate(argv, capsys)
    expected = "".join(
        f">>> {p}\n{plain_generate(model, tokenizer, p, max_new_tokens=6, do_sample=False)}\n\n" for p in prompts
    )
    assert out == expected


def test_default_max_new_tokens_is_half_the_context(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _, err = generate([str(tiny_gpt2_dir), "--prompt", PROMPT], capsys)
    assert "at most 32 new tokens" in err  # the tiny model has 64 positions


def test_seeded_sampling_is_reproducible(
    tiny_gpt2_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    model, tokenizer = model_and_tokenizer
    argv = [str(tiny_gpt2_dir), "--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "1.5", "--top-k", "0"]
    first, err = generate([*argv, "--seed", "3"], capsys)
    again, _ = generate([*argv, "--seed", "3"], capsys)
    other, _ = generate([*argv, "--seed", "4"], capsys)
    assert first == again and first != other
    assert "sampling, temperature 1.5, top-k 0" in err
    expected = plain_generate(
        model, tokenizer, PROMPT, seed=3, max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0
    )
    assert first == PROMPT + expected + "\n"


def test_prompts_file_plain_lines_and_jsonl(tmp_path: Path) -> None:
    plain = tmp_path / "prompts.txt"
    plain.write_text("ROMEO:\n\n  JULIET:\n")
    assert read_prompts(plain) == ["ROMEO:", "  JULIET:"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a\\nb"}\n{"instruction": "Who?", "input": "Lear", "output": "x"}\n')
    assert read_prompts(rows) == ["a\nb", "Who?\n\nLear"]
    rows.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(Exception, match="line 2 has no 'prompt'"):
        read_prompts(rows)
    rows.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(Exception, match="line 2 is not valid JSON"):
        read_prompts(rows)


def test_prompt_longer_than_the_context_is_one_line_with_counts(
    tiny_gpt2_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    _, tokenizer = model_and_tokenizer
    prompt = " ".join(["the king and the queen"] * 12)
    length = len(tokenizer(prompt).input_ids)
    assert length + 8 > 64
    err = error_of([str(tiny_gpt2_dir), "--prompt", prompt, "--max-new-tokens", "8"], capsys)
    assert f"is {length} tokens and --max-new-tokens is 8, but the model's context holds 64 positions" in err
    assert "at most 56 tokens" in err


def test_formats_follow_the_template_or_the_run(tiny_gpt2_dir: Path, chatml_dir: Path, tuned_dir: Path) -> None:
    from hfpipe.data.sft_rows import INSTRUCTION_PROMPT

    plain = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    templated = AutoTokenizer.from_pretrained(chatml_dir)
    assert pick_format(None, plain, str(tiny_gpt2_dir))[0] == "raw"
    assert pick_format(None, plain, str(tuned_dir)) == ("instruction", "hfpipe sft run without a chat template")
    assert pick_format(None, templated, str(chatml_dir))[0] == "chat"
    assert pick_format("raw", templated, str(chatml_dir))[0] == "raw"
    with pytest.raises(Exception, match="--format chat: .* has no chat template"):
        pick_format("chat", plain, str(tiny_gpt2_dir))
    assert render_prompt(plain, "Who?", "instruction") == INSTRUCTION_PROMPT.format(instruction="Who?")
    assert render_prompt(templated, "Who?", "chat", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_conversation_without_template_folds_into_the_instruction_layout(tiny_gpt2_dir: Path) -> None:
    messages = [
        {"role": "system", "content": "You know Shakespeare."},
        {"role": "user", "content": "Who is Lear?"},
        {"role": "assistant", "content": "A king."},
        {"role": "user", "content": "And Cordelia?"},
    ]
    expected = (
        "You know Shakespeare.\n\n"
        "### Instruction:\nWho is Lear?\n\n### Response:\nA king.\n\n"
        "### Instruction:\nAnd Cordelia?\n\n### Response:\n"
    )
    assert instruction_conversation(messages) == expected
    assert render_chat_prompt(AutoTokenizer.from_pretrained(tiny_gpt2_dir), messages) == expected


def test_chat_format_generates_from_the_template(chatml_dir: Path, capsys: pytest.CaptureFixture) -> None:
    model = AutoModelForCausalLM.from_pretrained(chatml_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(chatml_dir)
    out, err = generate([str(chatml_dir), "--prompt", "Who?", "--max-new-tokens", "8"], capsys)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out == tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    assert "format: chat (the tokenizer's chat template)" in err


def test_generation_config_keeps_the_models_own_and_is_greedy_by_default(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.2
    try:
        greedy = build_generation_config(model, tokenizer, max_new_tokens=5)
        sampled = build_generation_config(model, tokenizer, max_new_tokens=5, top_p=0.9)
        chosen = build_generation_config(model, tokenizer, max_new_tokens=5, do_sample=True, temperature=0.9)
    finally:
        model.generation_config.do_sample = False
        model.generation_config.temperature = None
    assert greedy.do_sample is False and greedy.max_new_tokens == 5
    assert greedy.eos_token_id == tokenizer.eos_token_id and greedy.pad_token_id == tokenizer.pad_token_id
    assert sampled.do_sample is True and sampled.top_p == 0.9 and sampled.temperature == 0.2  # the model's own
    assert chosen.temperature == 0.9
    assert model.generation_config.top_p is None  # the model's config is copied, never changed


def test_side_by_side_columns_fit_and_wrap() -> None:
    text = side_by_side([("greedy", "one two three four five six seven"), ("beam", "a\nb")], width=40)
    lines = text.splitlines()
    assert lines[0] == "greedy".ljust(18) + " | beam"
    assert lines[1] == "-" * 18 + "-+-" + "-" * 18
    assert lines[2] == "one two three four | a"
    assert lines[3] == "five six seven     | b"
    assert all(len(line) <= 40 for line in lines)
    assert side_by_side([("a", "x"), ("b", "y")], width=20) == "--- a\nx\n--- b\ny"  # too narrow: stacked


def test_compare_shows_every_strategy_as_model_generate_does(
    tiny_gpt2_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = model_and_tokenizer
    monkeypatch.setenv("COLUMNS", "160")
    out, _ = generate(
        [str(tiny_gpt2_dir), "--prompt", PROMPT, "--max-new-tokens", "10", "--compare", "--seed", "5"], capsys
    )
    columns = [
        (label, plain_generate(model, tokenizer, PROMPT, seed=5, max_new_tokens=10, **settings))
        for label, settings in COMPARE_STRATEGIES.items()
    ]
    assert [label for label, _ in columns] == ["greedy", "sampling t=0.7", "top-p 0.9", "beam search 4"]
    assert out == f">>> {PROMPT}\n{side_by_side(columns, 160)}\n\n"


def test_base_and_fine_tuned_side_by_side(
    tiny_gpt2_dir: Path, tuned_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    base, tokenizer = model_and_tokenizer
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir).eval()
    monkeypatch.setenv("COLUMNS", "120")
    argv = [str(tuned_dir), "--base", str(tiny_gpt2_dir), "--prompt", "Who is Lear?", "--max-new-tokens", "10"]
    out, err = generate(argv, capsys)
    prompt = render_prompt(tokenizer, "Who is Lear?", "instruction")  # the tuned run's format, for both
    columns = [
        (f"base: {tiny_gpt2_dir} (instruction)", plain_generate(base, tokenizer, prompt, max_new_tokens=10)),
        (f"fine-tuned: {tuned_dir} (instruction)", plain_generate(tuned, tokenizer, prompt, max_new_tokens=10)),
    ]
    assert columns[0][1] != columns[1][1]
    assert out == f">>> Who is Lear?\n{side_by_side(columns, 120)}\n\n"
    assert f"format: instruction (as for {tuned_dir})" in err


def test_next_token_lists_k_tokens_by_probability(
    tiny_gpt2_dir: Path, model_and_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    model, tokenizer = model_and_tokenizer
    out, _ = generate([str(tiny_gpt2_dir), "--prompt", PROMPT, "--next-token", "5"], capsys)
    lines = out.strip().splitlines()
    assert lines[0] == f">>> {PROMPT}" and lines[1].split() == ["rank", "probability", "id", "token"]
    rows = [line.split(maxsplit=3) for line in lines[2:]]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4, 5]
    probabilities = [float(row[1]) for row in rows]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0
    with torch.no_grad():
        logits = model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits[0, -1]
    expected = torch.softmax(logits, dim=-1).topk(5)
    assert [int(row[2]) for row in rows] == expected.indices.tolist()
    assert probabilities == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert rows[0][3] == repr(tokenizer.decode([expected.indices[0].item()]))


def test_adapter_dir_generates_like_its_merged_model(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    adapted = get_peft_model(base, config)
    adapted.save_pretrained(tmp_path / "adapter")
    shutil.copy(tiny_gpt2_dir / "tokenizer.json", tmp_path / "adapter")
    shutil.copy(tiny_gpt2_dir / "tokenizer_config.json", tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    merged = adapted.merge_and_unload().eval()
    out, err = generate([str(tmp_path / "adapter"), "--prompt", PROMPT, "--max-new-tokens", "8"], capsys)
    assert out == PROMPT + plain_generate(merged, tokenizer, PROMPT, max_new_tokens=8, do_sample=False) + "\n"
    assert f"(adapter on {tiny_gpt2_dir})" in err


def test_generate_chat_and_serve_share_the_loading_and_decoding_flags() -> None:
    import argparse
    import importlib

    def parse(tool: str, argv: list[str]) -> dict:
        parser = argparse.ArgumentParser()
        importlib.import_module(f"hfpipe.tools.{tool}").add_arguments(parser)
        return vars(parser.parse_args(["some-model", *argv]))

    loading = ["--dtype", "float32", "--device", "cpu", "--trust-remote-code"]
    decoding = ["--temperature", "0.5", "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1.2"]
    decoding += ["--max-new-tokens", "7", "--seed", "3"]
    expected_loading = {"dtype": "float32", "device": "cpu", "trust_remote_code": True}
    expected_decoding = {"temperature": 0.5, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.2}
    expected_decoding |= {"max_new_tokens": 7, "seed": 3}
    for tool in ("generate", "chat", "serve"):
        parsed = parse(tool, loading)
        assert {key: parsed[key] for key in expected_loading} == expected_loading, tool
    for tool in ("generate", "chat"):  # serve's decoding comes from each request (its --max-new-tokens is its own)
        parsed = parse(tool, [*loading, *decoding])
        assert {key: parsed[key] for key in expected_decoding} == expected_decoding, tool
        unset = parse(tool, [])
        assert {key: unset[key] for key in expected_decoding} == dict.fromkeys(expected_decoding), tool
