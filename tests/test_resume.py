"""Resume: kill -9 at any step and rerun gives the uninterrupted run's weights (pretraining; SFT, DPO, reward
models, KTO and GRPO, full and LoRA); SIGTERM checkpoints first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_dpo import write_dpo_config
from test_grpo import REWARDS, write_grpo_config
from test_kto import write_kto_config
from test_reward import write_reward_config
from test_sft import write_sft_config

from hfpipe.rundir import TRAINER_STATE, last_complete_checkpoint

RECIPE = str(ROOT / "recipes" / "pretrain.py")
# Dropout on, so that resuming must also restore the RNG streams to match.
RUN_FLAGS = [
    "--per_device_train_batch_size",
    "32",
    "--max_steps",
    "40",
    "--eval_steps",
    "10",
    "--dropout",
    "0.1",
    "--logging_steps",
    "10",
]


def launch(
    config: Path, output_dir: Path, *flags: str, recipe: str = RECIPE, run_flags: Sequence[str] = RUN_FLAGS
) -> subprocess.Popen:
    """Start the recipe in its own process, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, recipe, "--config", str(config), "--output_dir", str(output_dir), *run_flags, *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def wait_for_checkpoint(checkpoint: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the Trainer has written `checkpoint` completely: its last file, trainer_state.json, holds its JSON
    (the file is there, empty, from the moment it is opened)."""
    state = checkpoint / TRAINER_STATE
    wait_for(state, process, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            json.loads(state.read_text())
            return
        except ValueError:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, f"{state} was not completed"
            time.sleep(0.005)


def final_weights(output_dir: Path, weights: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(output_dir / weights)


def assert_kill_9_resume_matches(config: Path, weights: str = "model.safetensors", **how: Any) -> str:
    """Run `config` (with `launch`'s `how`) uninterrupted, then again killed with SIGKILL once its step-10 checkpoint
    is complete, and rerun: the rerun resumes from the last complete checkpoint with no setting changed and ends
    with the uninterrupted run's `weights`. Returns the rerun's output."""
    reference, interrupted = config.parent / "reference", config.parent / "interrupted"
    uninterrupted = launch(config, reference, **how)
    uninterrupted_output = uninterrupted.communicate()[0]  # read as it runs: a full pipe would stall the recipe
    assert uninterrupted.returncode == 0, uninterrupted_output

    process = launch(config, interrupted, **how)
    wait_for_checkpoint(interrupted / "checkpoint-10", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (interrupted / "metrics.json").exists(), "the run must have been killed before its end"
    resumed_from = last_complete_checkpoint(interrupted)
    assert resumed_from is not None

    rerun = launch(config, interrupted, **how)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert f"Resuming from {resumed_from}" in output
    assert "resuming with a changed setting" not in output
    expected, actual = final_weights(reference, weights), final_weights(interrupted, weights)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    return output


def test_kill_9_then_rerun_matches_an_uninterrupted_run(tiny_config) -> None:
    assert_kill_9_resume_matches(tiny_config())


@pytest.fixture(scope="module")
def dropout_gpt2_dir(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with dropout 0.1 (embeddings, attention, residuals), so that resuming a fine-tune must also
    restore the RNG streams to match (DPO and reward models turn dropout off: TRL's disable_dropout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dropout = {"embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1}
    directory = tmp_path_factory.mktemp("tiny-gpt2-dropout")
    AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, **dropout).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(directory)
    return directory


# Dropout in the adapters too.
LORA = "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [c_attn]\nlora_dropout: 0.1\n"
# 21 training rows (3 held out) or 24 pairs in batches of 4, 32 reward pairs in batches of 8: 40 steps cross several
# epochs and the kill after step 10 falls inside one, so the rerun must also restore the shuffled order and where it
# was in it.
TUNING_FLAGS = ["--max_steps", "40", "--eval_steps", "10", "--logging_steps", "10"]


@pytest.mark.parametrize(
    ("stage", "extra", "weights", "reference"),
    [
        ("sft", "", "model.safetensors", None),
        ("sft", LORA, "adapter_model.safetensors", None),
        ("dpo", "", "model.safetensors", "precompute"),
        ("dpo", LORA, "adapter_model.safetensors", "adapter"),
        ("reward", "", "model.safetensors", None),
        ("reward", LORA, "adapter_model.safetensors", None),
        ("kto", "", "model.safetensors", "precompute"),
        ("kto", LORA, "adapter_model.safetensors", "adapter"),
        ("grpo", "", "model.safetensors", None),
        ("grpo", LORA, "adapter_model.safetensors", None),
    ],
    ids=["sft-full", "sft-lora", "dpo-full", "dpo-lora", "reward-full", "reward-lora", "kto-full", "kto-lora",
         "grpo-full", "grpo-lora"],  # fmt: skip
)
def test_kill_9_then_rerun_of_a_fine_tune_matches_an_uninterrupted_run(
    stage: str, extra: str, weights: str, reference: str | None, tmp_path: Path, dropout_gpt2_dir: Path
) -> None:
    write = {
        "sft": write_sft_config,
        "dpo": write_dpo_config,
        "reward": write_reward_config,
        "kto": write_kto_config,
        "grpo": lambda directory, base, extra: write_grpo_config(directory, base, REWARDS + extra, steps=10),
    }[stage]
    config = write(tmp_path, dropout_gpt2_dir, extra=extra)
    recipe = str(ROOT / "recipes" / f"{stage}.py")
    assert_kill_9_resume_matches(config, weights, recipe=recipe, run_flags=TUNING_FLAGS)
    if reference is not None:  # DPO's reference: log-probs precomputed before training, or the adapter disabled
        assert json.loads((tmp_path / "interrupted" / "metrics.json").read_text())["reference"] == reference


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(tiny_config) -> None:
    config = tiny_config()
    output_dir = config.parent / "terminated"
    # Slow steps (larger batches) so that the run is still going when the JIT checkpoint fires.
    slow = ["--per_device_train_batch_size", "64", "--max_steps", "400"]
    process = launch(config, output_dir, *slow)
    wait_for(output_dir / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    assert "Run the same command to resume" in output
    checkpoint = last_complete_checkpoint(output_dir)
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) > 10
    assert not (output_dir / "metrics.json").exists()

    rerun = launch(config, output_dir, *slow[:2], "--max_steps", str(int(checkpoint.name.split("-")[1]) + 2))
    rerun_output = rerun.communicate()[0]
    assert rerun.returncode == 0, rerun_output
    assert f"Resuming from {checkpoint}" in rerun_output
    assert (
        f"warning: resuming with a changed setting: max_steps: 400 -> {int(checkpoint.name.split('-')[1]) + 2}"
        in rerun_output
    )
    assert (output_dir / "metrics.json").exists()


def test_half_written_checkpoints_are_skipped(tmp_path: Path) -> None:
    complete = tmp_path / "checkpoint-4"
    complete.mkdir()
    (complete / "trainer_state.json").write_text("{}")
    killed_mid_save = tmp_path / "checkpoint-6"
    killed_mid_save.mkdir()
    (killed_mid_save / "model.safetensors").write_text("partial")
    jit_unfinished = tmp_path / "checkpoint-8"
    jit_unfinished.mkdir()
    (jit_unfinished / "trainer_state.json").write_text("{}")
    (jit_unfinished / "checkpoint-is-incomplete.txt").write_text("")
    assert last_complete_checkpoint(tmp_path) == complete
    assert not killed_mid_save.exists() and not jit_unfinished.exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_resumes(
    tiny_config, pretrain_main, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import transformers.modeling_utils
    from safetensors import SafetensorError

    config = tiny_config()
    flags = ["--config", str(config), "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2"]
    real_save = transformers.modeling_utils.safe_save_file

    def save_until_the_disk_is_full(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):  # what safetensors raises on ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_until_the_disk_is_full)
    with pytest.raises(SystemExit) as stopped:
        pretrain_main(flags)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\x1b[A")[-1]  # after the progress bar's cursor-up
    assert err.startswith("error: ") and "the disk is full" in err and "checkpoint-2, the last complete" in err
    run = config.parent / "run"
    assert (run / "checkpoint-2").is_dir() and not (run / "checkpoint-4").exists()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)
    metrics = pretrain_main(flags)
    assert metrics["global_step"] == 4
    assert "Resuming from" in capsys.readouterr().out
