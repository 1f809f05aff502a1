"""A user error is one line and exit code 2 whichever documented way a recipe starts: plain python, `accelerate
launch`, `torchrun` with two processes, `hfpipe pipeline` (hfpipe_launch_hook.pth); a real failure keeps the
launcher's traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

import hfpipe_launch_hook

RECIPE = str(ROOT / "recipes" / "pretrain.py")
BIN = Path(sys.executable).parent
UNKNOWN_KEY = "unknown key 'learnin_rate'. Did you mean 'learning_rate'?"


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2, no traceback, the error once and last on stderr."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and message in last, output[-3000:]
    assert output.count(message) == 1, output[-3000:]


def free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture
def bad_config(tiny_config) -> Path:
    """A pretraining config with a misspelt key: refused before anything loads."""
    config = tiny_config()
    config.write_text(config.read_text() + "learnin_rate: 0.001\n")
    return config


def test_the_hook_is_installed_in_site_packages() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / "hfpipe_launch_hook.pth"
    assert pth.read_text() == hfpipe_launch_hook.PTH_LINE


def test_plain_python(bad_config: Path) -> None:
    assert_one_error_line(run([sys.executable, RECIPE, "--config", str(bad_config)]), UNKNOWN_KEY)


def test_accelerate_launch(bad_config: Path) -> None:
    assert_one_error_line(run([str(BIN / "accelerate"), "launch", RECIPE, "--config", str(bad_config)]), UNKNOWN_KEY)


def test_torchrun_two_processes_print_the_error_once(bad_config: Path) -> None:
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()]
    result = run([*torchrun, RECIPE, "--config", str(bad_config), "--ddp_backend", "gloo"])
    assert_one_error_line(result, UNKNOWN_KEY)


def test_a_stage_stopped_by_a_data_error_ends_the_pipeline_with_that_line(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    # The pipeline checks every config before it starts; rows are read only by the recipe.
    rows = [{"instruction": f"King {i}?", "output": f"Lear {i}."} for i in range(8)] + [{"instruction": "Why?"}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"# accelerate launch recipes/sft.py --config {config}\nmodel_name_or_path: {tiny_gpt2_dir}\n"
        f"train_files: [{data}]\noutput_dir: {tmp_path}/sft\nmax_length: 64\nmax_steps: 1\n"
    )
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"# hfpipe pipeline {pipeline}\nstages:\n  - {{name: sft, config: {config}}}\n")
    result = run([sys.executable, "-m", "hfpipe.cli", "pipeline", str(pipeline)])
    assert_one_error_line(result, "row 9: 'output' is empty")
    assert "pipeline stopped: stage 'sft' failed with exit code 2" in result.stderr


def test_a_real_failure_under_accelerate_launch_keeps_its_traceback(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text("raise RuntimeError('not a user error')\n")
    result = run([str(BIN / "accelerate"), "launch", str(script)])
    assert result.returncode == 1
    assert "RuntimeError: not a user error" in result.stderr
    assert "subprocess.CalledProcessError" in result.stderr and "non-zero exit status 1" in result.stderr


def test_only_workers_stopped_on_a_user_error_end_the_launcher_with_code_2() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(*codes: int) -> ChildFailedError:
        failures = {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(codes)}
        return ChildFailedError("recipes/pretrain.py", failures)

    assert hfpipe_launch_hook.stopped_on_user_error(failed(2, -signal.SIGTERM), None)  # the other rank was stopped
    assert hfpipe_launch_hook.stopped_on_user_error(failed(2, 2), None)
    assert not hfpipe_launch_hook.stopped_on_user_error(failed(2, 1), None)  # a real failure beside it
    assert not hfpipe_launch_hook.stopped_on_user_error(failed(-signal.SIGTERM, -signal.SIGTERM), None)
    # Not raised by accelerate's launcher (no traceback into it): some other command that exited 2.
    assert not hfpipe_launch_hook.stopped_on_user_error(subprocess.CalledProcessError(2, ["nvidia-smi"]), None)


@pytest.mark.parametrize(
    ("argv", "launcher"),
    [
        (["python", "/venv/bin/accelerate", "launch", "recipes/sft.py"], True),
        (["python", "/venv/bin/accelerate", "config"], False),
        (["python", "-u", "/venv/bin/torchrun", "--nproc_per_node", "2", "x.py"], True),
        (["python", "-X", "importtime", "-m", "torch.distributed.run", "x.py"], True),
        (["python", "recipes/pretrain.py", "--output_dir", "outputs/torchrun"], False),
        (["python", "-c", "import accelerate"], False),
    ],
)
def test_the_hook_acts_only_in_launchers(argv: list[str], launcher: bool) -> None:
    assert hfpipe_launch_hook.is_launcher(argv) is launcher
