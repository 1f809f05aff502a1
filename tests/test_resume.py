"""Resume: kill -9 at any step and rerun gives the uninterrupted run's weights; SIGTERM checkpoints first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from hfpipe.rundir import last_complete_checkpoint

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


def launch(config: Path, output_dir: Path, *flags: str) -> subprocess.Popen:
    """Start the recipe in its own process, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, RECIPE, "--config", str(config), "--output_dir", str(output_dir), *RUN_FLAGS, *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def test_kill_9_then_rerun_matches_an_uninterrupted_run(tiny_config) -> None:
    config = tiny_config()
    reference, interrupted = config.parent / "reference", config.parent / "interrupted"
    assert launch(config, reference).wait() == 0

    process = launch(config, interrupted)
    wait_for(interrupted / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (interrupted / "metrics.json").exists(), "the run must have been killed before its end"
    resumed_from = last_complete_checkpoint(interrupted)
    assert resumed_from is not None

    rerun = launch(config, interrupted)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert f"Resuming from {resumed_from}" in output
    assert "resuming with a changed setting" not in output
    expected, actual = final_weights(reference), final_weights(interrupted)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


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
