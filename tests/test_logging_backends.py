"""report_to: tensorboard and report_to: trackio, both local: a short SFT run with the network guarded writes logs into
its run dir that the backend's own reader loads, with the run's loss series; report_to names are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_network import NETWORK_GUARD, run_guarded
from test_sft import write_sft_config

from hfpipe.errors import ConfigError
from hfpipe.rundir import TRACKIO_DIR, TRAINER_STATE, last_complete_checkpoint
from hfpipe.train import run_settings

STEPS = 3
# The SFT recipe with the command line given, then the recorded connection attempts.
GUARDED_TRAINING = (
    NETWORK_GUARD
    + r"""
sys.argv = ["recipes/sft.py", *sys.argv[1:]]
runpy.run_path("recipes/sft.py", run_name="__main__")
print_attempts()
"""
)


def train_guarded(tmp_path: Path, base: Path, report_to: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Train the tiny GPT-2 for STEPS steps, logging every step to `report_to`, in a child process with the network
    guard on and the offline switches off; assert it tried no connection; return the run dir."""
    for variable in ("TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(variable, raising=False)
    config = write_sft_config(tmp_path, base, extra=f"report_to: {report_to}\n")
    report = run_guarded(GUARDED_TRAINING, ["--config", str(config), "--max_steps", str(STEPS)], tmp_path)
    assert report == {"attempts": [], "telemetry_thread": False}
    return tmp_path / "run"


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of each log entry, from the last checkpoint's trainer_state.json."""
    state = json.loads((last_complete_checkpoint(run_dir) / TRAINER_STATE).read_text())
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def test_tensorboard_logs_the_loss_series_into_the_run_dir(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[logging]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_guarded(tmp_path, tiny_gpt2_dir, "tensorboard", monkeypatch)
    (event_dir,) = (run_dir / "runs").iterdir()  # transformers' default: <output_dir>/runs/<date>_<host>
    events = EventAccumulator(str(event_dir))
    events.Reload()
    assert {"train/loss", "eval/loss"} <= set(events.Tags()["scalars"])
    losses = logged_losses(run_dir)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    scalars = events.Scalars("train/loss")
    assert [event.step for event in scalars] == [step for step, _ in losses]
    # TensorBoard stores float32.
    assert [event.value for event in scalars] == pytest.approx([loss for _, loss in losses], rel=1e-6)


def test_trackio_logs_the_loss_series_into_the_run_dir(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("trackio", reason="trackio is not installed (pip install -e '.[logging]')")
    run_dir = train_guarded(tmp_path, tiny_gpt2_dir, "trackio", monkeypatch)
    assert (run_dir / TRACKIO_DIR / "huggingface.db").is_file()
    assert not (tmp_path / "hf-home" / "trackio").exists()  # not trackio's own default, $HF_HOME/trackio
    series = {metric: read_trackio_metric(run_dir, metric) for metric in ("train/loss", "train/global_step")}
    # trackio numbers its own steps (evaluations take some): the Trainer's step is logged beside each entry.
    global_step = {row["step"]: row["value"] for row in series["train/global_step"]}
    losses = [(global_step[row["step"]], row["value"]) for row in series["train/loss"]]
    assert losses == logged_losses(run_dir) and len(losses) == STEPS


def read_trackio_metric(run_dir: Path, metric: str) -> list[dict]:
    """The rows (step, value, timestamp) of `metric` in the run's trackio store, read by trackio's own CLI."""
    read = subprocess.run(
        [Path(sys.executable).parent / "trackio", "get", "metric", "--project", "huggingface", "--run", run_dir.name]
        + ["--metric", metric, "--json"],
        env={**os.environ, "TRACKIO_DIR": str(run_dir / TRACKIO_DIR)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read.returncode == 0, read.stdout + read.stderr
    return json.loads(read.stdout)["values"]


@pytest.mark.parametrize("value", ["tensorboard", "trackio", ["tensorboard", "trackio"]])
def test_report_to_accepts_the_local_backends(value: str | list[str]) -> None:
    run_settings.check_report_to({"report_to": value}, "config.yaml")


@pytest.mark.parametrize(
    ("value", "suggestion"), [("trackoi", "trackio"), (["tensorboard", "tensorbaord"], "tensorboard")]
)
def test_report_to_refuses_a_misspelt_backend_with_a_suggestion(value: str | list[str], suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"is not valid.*Did you mean '{suggestion}'"):
        run_settings.check_report_to({"report_to": value}, "config.yaml")


@pytest.fixture
def trackio_unset(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TRACKIO_DIR from the user or an earlier run, and trackio not imported; the environment restored after."""
    monkeypatch.setenv("TRACKIO_DIR", "")  # recorded, so that the value the test sets is undone
    monkeypatch.delenv("TRACKIO_DIR")
    monkeypatch.setattr(run_settings, "_trackio_dir_set_here", None)
    monkeypatch.delitem(sys.modules, "trackio.utils", raising=False)
    return monkeypatch


def test_trackio_store_goes_to_each_run_dir_unless_the_user_chose_one(tmp_path: Path, trackio_unset) -> None:
    assert run_settings.keep_trackio_in_run_dir(["tensorboard"], tmp_path / "a") is None
    assert "TRACKIO_DIR" not in os.environ
    for name in ("a", "b"):  # a second run in the same process gets its own dir, not the first one's
        chosen = run_settings.keep_trackio_in_run_dir(["trackio"], tmp_path / name)
        assert chosen == tmp_path / name / TRACKIO_DIR and os.environ["TRACKIO_DIR"] == str(chosen)
    trackio_unset.setenv("TRACKIO_DIR", str(tmp_path / "mine"))
    assert run_settings.keep_trackio_in_run_dir(["trackio"], tmp_path / "c") == tmp_path / "mine"
    assert os.environ["TRACKIO_DIR"] == str(tmp_path / "mine")


def test_trackio_imported_earlier_keeps_its_dir_and_says_so(tmp_path: Path, trackio_unset, capsys) -> None:
    trackio_unset.setitem(sys.modules, "trackio.utils", SimpleNamespace(TRACKIO_DIR=tmp_path / "first"))
    assert run_settings.keep_trackio_in_run_dir(["trackio"], tmp_path / "run") == tmp_path / "first"
    assert f"it logs to {tmp_path / 'first'}, not {tmp_path / 'run' / TRACKIO_DIR}" in capsys.readouterr().out
