"""One run per output dir: a second run into a dir where a run is training is refused in one line naming the dir
and the process; a lock left by a killed run is taken over."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hfpipe import cli
from hfpipe.rundir import RUN_LOCK, lock_holder

HOLD = (
    "import sys, time; from pathlib import Path; from hfpipe.rundir import hold_run_lock\n"
    "lock = hold_run_lock(Path(sys.argv[1]), 'test'); print('held', flush=True); time.sleep(120)"
)


def test_a_second_run_into_a_busy_dir_is_refused_and_a_dead_runs_lock_is_taken_over(
    tiny_config: Callable[..., Path], pretrain_main, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config()
    run_dir = config.parent / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"process {holder.pid}" in lock_holder(run_dir)
        cli.main(["check", str(config)])
        assert "in use by a run still training" in capsys.readouterr().out
        for overwrite in ("false", "true"):
            with pytest.raises(SystemExit) as stopped:
                pretrain_main(["--config", str(config), "--overwrite_output_dir", overwrite])
            assert stopped.value.code == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and "\n" not in err
            assert f"'{run_dir}' is in use by a run that is still training (process {holder.pid}" in err
        assert not (run_dir / "metrics.json").exists() and sorted(p.name for p in run_dir.iterdir()) == [RUN_LOCK]
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(run_dir) is None  # the lock file is still there, its process is gone
    metrics = pretrain_main(["--config", str(config)])
    assert metrics["global_step"] == 2 and (run_dir / "metrics.json").is_file()
