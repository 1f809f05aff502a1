"""The SFT recipe: loss masks token by token, full and LoRA runs, merge, template check, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfpipe.data.chat_templates import check_saved_model

ROWS = [
    {"instruction": f"Who is king number {i}?", "input": "", "output": f"The king number {i} is Lear."}
    for i in range(24)
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_sft_config(directory: Path, base: Path, rows: list[dict] = ROWS, extra: str = "") -> Path:
    """An SFT config for the model dir `base` on `rows`, 2 steps, writing to directory/run."""
    directory.mkdir(parents=True, exist_ok=True)
    data = write_rows(directory / "train.jsonl", rows)
    config = directory / "sft.yaml"
    config.write_text(
        f"""# accelerate launch recipes/sft.py --config {config}
model_name_or_path: {base}
train_files: [{data}]
output_dir: {directory}/run
max_length: 64
per_device_train_batch_size: 4
max_steps: 2
eval_steps: 2
logging_steps: 1
learning_rate: 1.0e-2
sample_max_new_tokens: 4
{extra}"""
    )
    return config


@pytest.fixture
def sft_config(tmp_path: Path, tiny_gpt2_dir: Path):
    """Factory: an SFT config for the tiny GPT-2 on 24 instruction rows, 2 steps."""

    def make(rows: list[dict] = ROWS, extra: str = "") -> Path:
        return write_sft_config(tmp_path, tiny_gpt2_dir, rows, extra)

    return make


def cpu_sft_args(**settings):
    """An SFTConfig that runs here: CPU, fp32, no checkpointing, no reporting."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", activation_checkpointing=False, **settings
    )


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def test_instruction_loss_covers_the_response_and_eos_only(tiny_gpt2_dir: Path) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    from hfpipe.data.sft_rows import convert_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    row = convert_row(ROWS[3], "instruction", chat=False, system_prompt=None)
    args = cpu_sft_args(max_length=256, per_device_train_batch_size=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tokenizer)
    batch = first_batch(trainer)
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    completion_ids = tokenizer(row["prompt"] + row["completion"])["input_ids"][len(prompt_ids) :] + [
        tokenizer.eos_token_id
    ]
    labels = batch["labels"][0].tolist()
    assert batch["input_ids"][0].tolist() == prompt_ids + completion_ids
    assert labels == [-100] * len(prompt_ids) + completion_ids  # token by token: prompt masked, response + EOS kept


def test_chatml_conversations_train_on_assistant_tokens_only(tiny_gpt2_dir: Path) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    from hfpipe.data.chat_templates import apply_chat_template_choice, fit_model_to_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    choice = apply_chat_template_choice("chatml", tokenizer)
    fit_model_to_tokenizer(model, tokenizer)
    assert "added tokens" in choice and tokenizer.eos_token == "<|im_end|>"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    messages = [
        {"role": "user", "content": "the king"},
        {"role": "assistant", "content": "speaks"},
        {"role": "user", "content": "the queen"},
        {"role": "assistant", "content": "hears"},
    ]
    args = cpu_sft_args(max_length=128, per_device_train_batch_size=1, assistant_only_loss=True)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([{"messages": messages}]), processing_class=tokenizer
    )
    batch = first_batch(trainer)
    kept = [
        token
        for token, label in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), strict=True)
        if label != -100
    ]
    assert tokenizer.decode(kept) == "speaks<|im_end|>hears<|im_end|>"


def test_full_fine_tune_runs_and_changes_weights(sft_config, sft_main, tiny_gpt2_dir: Path) -> None:
    config = sft_config()
    metrics = sft_main(["--config", str(config), "--eval_on_start", "false"])
    assert metrics["eval_loss_at_start"] is None
    metrics = sft_main(["--config", str(config), "--overwrite_output_dir", "true"])
    assert metrics["eval_loss_at_start"] > metrics["eval_loss"]
    run = config.parent / "run"
    before, after = load_file(tiny_gpt2_dir / "model.safetensors"), load_file(run / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert metrics["template_check"] == "ok" and metrics["loss_on"] == "completion"
    assert metrics["global_step"] == 2 and "eval_loss" in metrics
    assert (run / "config.yaml").read_text().startswith("# accelerate launch recipes/sft.py")
    assert AutoTokenizer.from_pretrained(run).eos_token == AutoTokenizer.from_pretrained(tiny_gpt2_dir).eos_token


def test_lora_with_one_target_changes_only_the_adapter_and_merges(sft_config, sft_main, tiny_gpt2_dir: Path) -> None:
    config = sft_config(
        extra="use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [c_attn]\nmerge_adapter: true\n"
    )
    metrics = sft_main(["--config", str(config)])
    run = config.parent / "run"
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all("lora_" in name and "c_attn" in name for name in adapter)  # one name, not a dead regex
    assert len(adapter) == 2 * 2  # lora_A and lora_B in each of the 2 layers
    assert metrics["trainable_parameters"] == sum(t.numel() for t in adapter.values())
    assert not (run / "model.safetensors").exists()

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    original = load_file(tiny_gpt2_dir / "model.safetensors")
    with_adapter = PeftModel.from_pretrained(base, run)
    for name, tensor in with_adapter.base_model.model.state_dict().items():
        clean = name.replace("base_layer.", "")
        if clean in original:
            assert torch.equal(tensor, original[clean]), f"base weight {name} changed"
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(
        merged.state_dict()["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"]
    )


def test_template_check_catches_a_broken_saved_tokenizer(sft_config, sft_main) -> None:
    config = sft_config()
    sft_main(["--config", str(config)])
    run = config.parent / "run"
    row = {
        "prompt": "### Instruction:\nWho is king number 1?\n\n### Response:\n",
        "completion": "The king number 1 is Lear.",
    }
    tokenizer = AutoTokenizer.from_pretrained(run)
    trained = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
    assert check_saved_model(run, row, trained) == []
    generation = json.loads((run / "generation_config.json").read_text())
    generation["eos_token_id"] = 12345
    (run / "generation_config.json").write_text(json.dumps(generation))
    tokenizer.eos_token = "king"  # a different EOS: training rows no longer render the same
    tokenizer.save_pretrained(run)
    problems = check_saved_model(run, row, trained)
    assert any("renders the first training row differently" in p for p in problems)
    assert any("does not stop at the tokenizer's EOS" in p for p in problems)


@pytest.mark.parametrize(
    ("extra", "rows", "expected"),
    [
        ("load_in_4bit: true\n", ROWS, "load_in_4bit quantizes the base model, which then cannot be trained"),
        ("merge_adapter: true\n", ROWS, "merge_adapter needs use_peft: true"),
        ("max_eval_samples: 0\n", ROWS, "max_eval_samples: 0 must be greater than 0"),
        ("chat_template: vicuna\n", ROWS, "chat_template: 'vicuna' is neither a built-in template (chatml)"),
        ("", [*ROWS[:3], {"instruction": "Who?", "output": ""}], "train.jsonl: row 4: 'output' is empty"),
        (
            "",
            [{"question": "Who?", "answer": "Lear"}],
            "cannot tell the row format from its columns (answer, question)",
        ),
        ("max_length: 8\n", ROWS, "row 1: the prompt alone is"),
        ("max_length: 512\n", ROWS, "max_length=512 exceeds the 64 positions of"),
        ("learnin_rate: 1.0\n", ROWS, "Did you mean 'learning_rate'?"),
        (
            "max_seq_length: 64\n",
            ROWS,
            "'max_seq_length' was renamed in recent transformers/TRL releases: use 'max_length'",
        ),
    ],
)
def test_bad_sft_input_is_one_clear_line(sft_config, sft_main, capsys, extra: str, rows: list, expected: str) -> None:
    config = sft_config(rows=rows, extra=extra)
    if "max_length: " in extra or "max_seq_length" in extra:
        config.write_text(config.read_text().replace("max_length: 64\n", ""))
    with pytest.raises(SystemExit) as exit_info:
        sft_main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    # Loading data may draw progress bars first; the error itself is the last line.
    assert "Traceback" not in err and expected in err.splitlines()[-1], err
    assert err.splitlines()[-1].startswith("error: ")
    assert not (config.parent / "run" / "metrics.json").exists()


def test_check_refuses_a_max_length_beyond_the_models_positions_before_loading_it(
    sft_config, capsys, monkeypatch
) -> None:
    from hfpipe.cli import main as hfpipe_main

    monkeypatch.setattr("hfpipe.train.tuning.load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stopped:
        hfpipe_main(["check", str(sft_config()), "--max_length", "65"])
    assert stopped.value.code == 2
    assert "max_length=65 exceeds the 64 positions of" in capsys.readouterr().err


def test_check_show_samples_marks_the_trained_span(tiny_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    from hfpipe.cli import main as hfpipe_main
    from hfpipe.models.gpt2 import build_gpt2

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model_dir = tmp_path / "gpt2-256"  # room for max_length 256
    build_gpt2({"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 256}, 0.0, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = write_sft_config(tmp_path, model_dir)
    hfpipe_main(["check", str(config), "--show-samples", "2", "--max_length", "256"])
    out = capsys.readouterr().out
    assert "valid for recipes/sft.py" in out and "loss on: completion tokens" in out
    assert "--- sample 1:" in out and "--- sample 2:" in out and "--- sample 3:" not in out
    assert "### Response:\n\u27e6The king number" in out and "Lear.<|endoftext|>\u27e7" in out
    assert "ends with EOS '<|endoftext|>': True" in out
    assert not (config.parent / "run").exists()


@pytest.mark.parametrize("architecture", ["gpt2", "llama-lora"])
def test_fast_trainer_gives_trls_loss_and_gradients(architecture: str, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTTrainer

    from hfpipe.data.sft_rows import convert_row
    from hfpipe.train.sft_trainer import FastSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    varied = [{"instruction": "Who?", "input": "", "output": "Lear." + " Yes." * i} for i in range(4)]
    rows = Dataset.from_list([convert_row(row, "instruction", False, None) for row in varied])
    args = cpu_sft_args(max_length=64, per_device_train_batch_size=4)
    model_dir, peft_config = tiny_gpt2_dir, None
    if architecture == "llama-lora":  # with grouped-query attention (4 query heads, 2 key/value heads)
        torch.manual_seed(0)
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        shape["num_key_value_heads"] = 2
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape)).save_pretrained(tmp_path / "llama")
        model_dir, peft_config = tmp_path / "llama", LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    results = []
    for make in (
        lambda **kw: SFTTrainer(**kw),
        lambda **kw: FastSFTTrainer(**kw, model_loss=True),
    ):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = make(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).sum() > (batch["attention_mask"] == 0).sum()  # prompts are masked too
        assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is handled
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    assert trainer._head_on_labels_only is True  # the labelled-positions path ran
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][1].keys() == results[0][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_keeps_the_models_own_loss(sft_config, sft_main) -> None:
    metrics = sft_main(["--config", str(sft_config(extra="activation_checkpointing: true\n"))])
    assert metrics["global_step"] == 2 and metrics["train_loss"] > 0  # recomputation would not see the unpadded path


def test_dora_adapter_trains_magnitudes_too(sft_config, sft_main) -> None:
    config = sft_config(extra="use_peft: true\nuse_dora: true\nlora_r: 4\nlora_target_modules: all-linear\n")
    metrics = sft_main(["--config", str(config)])
    adapter = load_file(config.parent / "run" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in adapter)
    assert metrics["trainable_parameters"] == sum(t.numel() for t in adapter.values())


def test_mixture_of_two_formats_keeps_its_shares(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    from hfpipe.data import load_splits, prepare_sft_rows
    from hfpipe.train.sft import parse as parse_sft
    from hfpipe.train.tuning import load_tokenizer

    instructions = write_rows(tmp_path / "a.jsonl", ROWS)  # 24 rows
    pairs = write_rows(
        tmp_path / "b.jsonl",
        [{"prompt": f"Count to {i}:", "completion": " ".join(map(str, range(i)))} for i in range(2, 12)],
    )
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"""# accelerate launch recipes/sft.py --config {config}
model_name_or_path: {tiny_gpt2_dir}
output_dir: {tmp_path}/run
datasets:
  - path: {instructions}
    fraction: 3
  - path: {pairs}
    fraction: 1
test_split_size: 0.25
max_length: 64
"""
    )
    parsed = parse_sft(["--config", str(config)])
    tokenizer, _, _ = load_tokenizer(parsed)
    splits, table = load_splits(parsed, tokenizer, smoke=False, prepare=prepare_sft_rows)
    assert len(splits["train"]) + len(splits["validation"]) == 24 + 8  # 75% / 25%, the 24 rows cap the total
    assert "a.jsonl" in table and "instruction" in table and "prompt_completion" in table and "75.0%" in table
    assert set(splits["train"].column_names) == {"prompt", "completion"}


def test_max_eval_samples_keeps_the_first_held_out_rows(tmp_path: Path, sft_config) -> None:
    from hfpipe.data import load_splits, prepare_sft_rows
    from hfpipe.train.sft import parse as parse_sft
    from hfpipe.train.tuning import load_tokenizer

    held_out = write_rows(tmp_path / "held_out.jsonl", ROWS[:10])
    config = sft_config(extra=f"validation_files: [{held_out}]\nmax_eval_samples: 3\n")
    parsed = parse_sft(["--config", str(config)])
    tokenizer, _, _ = load_tokenizer(parsed)
    splits, _ = load_splits(parsed, tokenizer, smoke=False, prepare=prepare_sft_rows)
    full, _ = load_splits(
        parse_sft(["--config", str(config), "--max_eval_samples", "100"]), tokenizer, False, prepare_sft_rows
    )
    assert len(full["validation"]) == 10 and len(splits["train"]) == len(ROWS)
    assert splits["validation"].to_list() == full["validation"].to_list()[:3]


def test_eval_keys_evaluate_the_trained_model_at_the_end(sft_config, sft_main, tmp_path: Path, capsys) -> None:
    choices = tmp_path / "mc.jsonl"
    choices.write_text(json.dumps({"context": "Who is king?", "endings": [" Lear.", " The sea."], "label": 0}) + "\n")
    metrics = sft_main(["--config", str(sft_config(extra=f"eval_choice_files: [{choices}]\n"))])
    assert metrics["mc_rows"] == 1 and metrics["mc_acc"] in (0.0, 1.0)
    choices.write_text(json.dumps({"context": "Who?", "endings": [" Lear."], "label": 3}) + "\n")
    config = sft_config(extra=f"eval_choice_files: [{choices}]\n")
    with pytest.raises(SystemExit) as exit_info:
        sft_main(["--config", str(config), "--overwrite_output_dir", "1"])
    assert exit_info.value.code == 2 and "mc.jsonl: line 1" in capsys.readouterr().err


def test_every_run_writes_a_report_without_secrets(sft_config, sft_main) -> None:
    config = sft_config(extra="hub_token: hf_FAKEsecret0123456789\n")
    sft_main(["--config", str(config)])
    run = config.parent / "run"
    report = (run / "report.md").read_text()
    for section in ("## Results", "## Configuration", "## Data sources and shares", "## Versions", "![loss.png]"):
        assert section in report
    assert "Samples at step 0" in report and "Samples at step 2" in report  # before and after training
    assert "train.jsonl" in report and "transformers" in report and "git commit" in report
    for path in (run / "report.md", run / "report.html", run / "config.yaml", run / "metrics.json"):
        assert "hf_FAKEsecret" not in path.read_text()
    assert "<h2>Results</h2>" in (run / "report.html").read_text()


@pytest.mark.parametrize(
    ("rows", "extra", "advice"),
    [(ROWS[:1], "", "Add rows"), (ROWS[:2], "test_split_size: 0.6\n", "lower test_split_size")],
)
def test_too_few_rows_to_hold_out_validation_is_one_clear_line(
    sft_config, sft_main, capsys, rows: list, extra: str, advice: str
) -> None:
    config = sft_config(rows=rows, extra=extra)
    with pytest.raises(SystemExit) as exit_info:
        sft_main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"error: {config}: ") and "train.jsonl" in last, err
    assert f"{len(rows)} training row" in last and "validation_files" in last and advice in last


def test_greedy_stop_rate_in_batches_counts_as_one_prompt_at_a_time(tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfpipe.train.sft import greedy_stop_rate

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    eos = tokenizer.eos_token_id
    prompts = ["the king speaks", "my lady and the sword", "what night is this", "go stay know think", "x " * 60]
    with torch.no_grad():  # EOS aligned with the end of the first prompt: some prompts stop, some do not
        ids = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
        hidden = model.transformer(ids).last_hidden_state[0, -1]
        model.lm_head.weight[eos] = 4 * hidden / hidden.norm()
    one_by_one = []
    for prompt in prompts[:-1]:  # the last leaves no room in the 64 positions: skipped, but counted
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        one_by_one.append(int(output[0, -1] == eos))
    assert 0 < sum(one_by_one) < len(one_by_one)
    assert greedy_stop_rate(model, tokenizer, prompts, max_new_tokens=12) == sum(one_by_one) / len(prompts)
