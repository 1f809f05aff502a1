"""Two-process DDP on CPU (torchrun, gloo): both ranks train, in sync, and match one process with the same
global batch."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

RECIPE = str(ROOT / "recipes" / "pretrain.py")
FLAGS = ["--max_steps", "6", "--eval_steps", "3", "--logging_steps", "1", "--sample_max_new_tokens", "4"]
# Same data order, same initial weights: only the reduction order of the gradients differs.
LOSS_TOLERANCE = 1e-4


def run(command: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def step_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_process_ddp_matches_single_process(tiny_config) -> None:
    config = tiny_config()
    ddp_dir, single_dir = config.parent / "ddp", config.parent / "single"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    output = run(
        [
            *torchrun,
            RECIPE,
            "--config",
            str(config),
            "--output_dir",
            str(ddp_dir),
            *FLAGS,
            "--ddp_backend",
            "gloo",
            "--per_device_train_batch_size",
            "2",
        ]
    )
    run(
        [
            sys.executable,
            RECIPE,
            "--config",
            str(config),
            "--output_dir",
            str(single_dir),
            *FLAGS,
            "--per_device_train_batch_size",
            "4",
        ]
    )

    reports = dict(re.findall(r"\[rank (\d)/2\] trained 6 steps, weights checksum ([\d.]+)", output))
    assert set(reports) == {"0", "1"}, output[-2000:]
    assert reports["0"] == reports["1"], "DDP ranks must hold identical weights"
    assert json.loads((ddp_dir / "metrics.json").read_text())["world_size"] == 2

    ddp, single = step_losses(ddp_dir), step_losses(single_dir)
    assert len(ddp) == len(single) == 6
    for step, (a, b) in enumerate(zip(ddp, single, strict=True), start=1):
        assert abs(a - b) <= LOSS_TOLERANCE * max(1.0, abs(b)), f"step {step}: ddp {a} vs single {b}"
