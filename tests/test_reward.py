"""The reward-model recipe: a one-number head on a causal LM learns to rank chosen above rejected on pairs it never
trained on; full and LoRA; records and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_recipe
from safetensors.torch import load_file
from test_dpo import write_rows

# An easy, planted preference: the chosen answer affirms, the rejected one denies; held-out pairs use other prompts.
EASY = [{"instruction": f"Is {i} a number?", "chosen": "yes yes yes", "rejected": "no no no"} for i in range(32)]
EASY_HELD_OUT = [{"instruction": f"Is {i} a word?", "chosen": "yes yes yes", "rejected": "no no no"} for i in range(8)]


@pytest.fixture(scope="module")
def reward_main():
    return load_recipe("reward").main


def write_reward_config(directory: Path, base: Path, extra: str = "", steps: int = 2) -> Path:
    """A reward config for the model dir `base` on the easy pairs and 8 held-out ones, writing to directory/run."""
    train = write_rows(directory / "train.jsonl", EASY)
    held_out = write_rows(directory / "test.jsonl", EASY_HELD_OUT)
    config = directory / "reward.yaml"
    config.write_text(
        f"""# accelerate launch recipes/reward.py --config {config}
model_name_or_path: {base}
train_files: [{train}]
validation_files: [{held_out}]
output_dir: {directory}/run
max_length: 64
per_device_train_batch_size: 8
max_steps: {steps}
eval_steps: {steps}
logging_steps: 1
learning_rate: 3.0e-3
{extra}"""
    )
    return config


def test_a_reward_model_trains_and_ranks_a_planted_pair_it_never_saw(
    tmp_path: Path, tiny_gpt2_dir: Path, reward_main
) -> None:
    metrics = reward_main(["--config", str(write_reward_config(tmp_path, tiny_gpt2_dir, steps=12))])
    run = tmp_path / "run"
    assert metrics["stage"] == "reward" and metrics["global_step"] == 12
    assert metrics["heldout_pair_accuracy_after"] == 1.0
    # A random head may rank the pair either way; training widens the margin of chosen over rejected by far.
    assert metrics["heldout_pair_margin_after"] > metrics["heldout_pair_margin_before"] + 1.0
    assert "eval_accuracy_at_start" in metrics
    assert (run / "rewards.png").is_file() and (run / "loss.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1
    before, after = load_file(tiny_gpt2_dir / "model.safetensors"), load_file(run / "model.safetensors")
    assert "score.weight" in after and not torch.equal(
        before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"]
    )


def test_a_lora_reward_model_saves_the_adapter_with_its_head(tmp_path: Path, tiny_gpt2_dir: Path, reward_main) -> None:
    lora = "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [c_attn, c_proj]\n"
    reward_main(["--config", str(write_reward_config(tmp_path, tiny_gpt2_dir, lora))])
    run = tmp_path / "run"
    adapter = load_file(run / "adapter_model.safetensors")
    assert not (run / "model.safetensors").exists()
    assert any("score" in name for name in adapter), "the new head is trained and saved with the adapter"
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    assert json.loads((run / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_a_reward_run_is_refused_by_the_generating_tools(tmp_path: Path, tiny_gpt2_dir: Path, reward_main, capsys):
    from hfpipe import cli

    reward_main(["--config", str(write_reward_config(tmp_path, tiny_gpt2_dir))])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["generate", str(tmp_path / "run"), "--prompt", "Is 3 a number?"])
    assert stopped.value.code == 2
    assert "a reward run scores text (reward model); it does not generate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("sample_prompts: [hello]\n", "sample_prompts: a reward model scores text and generates none"),
        ("merge_adapter: true\n", "merge_adapter needs use_peft: true"),
        ("use_peft: true\nlora_task_type: CAUSAL_LM\n", "a reward model's adapter is SEQ_CLS"),
    ],
)
def test_bad_reward_configs_are_one_line_before_loading(
    extra: str, expected: str, tmp_path: Path, tiny_gpt2_dir: Path, reward_main, capsys
) -> None:
    with pytest.raises(SystemExit) as stopped:
        reward_main(["--config", str(write_reward_config(tmp_path, tiny_gpt2_dir, extra))])
    assert stopped.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "metrics.json").exists()
