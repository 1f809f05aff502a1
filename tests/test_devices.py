"""The CPU bf16 decision: a measured probe (timing injected here), its threshold, its cache per CPU model, torch
version and thread count, the HFPIPE_CPU_BF16 override, and device_defaults following it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from hfpipe import devices
from hfpipe.devices import (
    BF16_MIN_SPEEDUP,
    CPU_BF16_ENV,
    PROBE_MIN_PAIRS,
    PROBE_PAIRS,
    Bf16Probe,
    cpu_bf16_cache_path,
    cpu_bf16_decision,
    device_defaults,
    measure_cpu_bf16,
    run_threads,
    use_cpu_cores,
)
from hfpipe.errors import ConfigError

FP32_STEP = 0.010  # seconds of a fake fp32 step
REAL_CPU_MODEL = devices.cpu_model  # before the fixture below stands in for it


class FakeTiming:
    """A clock that only the injected step advances: an fp32 step takes FP32_STEP, a bf16 one FP32_STEP / speedup;
    the CPU clock advances `busy` times as fast per thread (below 1: other processes had the cores)."""

    def __init__(self, speedup: float, busy: float = 1.0) -> None:
        self.now = 0.0
        self.cpu = 0.0
        self.speedup = speedup
        self.threads = 1
        self.busy = busy
        self.order: list[bool] = []

    def step(self, bf16: bool) -> None:
        self.order.append(bf16)
        seconds = FP32_STEP / self.speedup if bf16 else FP32_STEP
        self.now += seconds
        self.cpu += seconds * self.threads * self.busy

    def probe(self, threads: int) -> Bf16Probe:
        self.threads = threads
        return measure_cpu_bf16(threads, step=self.step, clock=lambda: self.now, cpu_clock=lambda: self.cpu)


class CountingProbe:
    """A probe that counts its calls and answers with FakeTiming; `busy` below 1 on more than one thread stands for
    other processes holding the cores, and `lone_speedup` for what one thread measures then."""

    def __init__(self, speedup: float, busy: float = 1.0, lone_speedup: float | None = None) -> None:
        self.speedup = speedup
        self.busy = busy
        self.lone_speedup = lone_speedup or speedup
        self.threads: list[int] = []

    def __call__(self, threads: int) -> Bf16Probe:
        self.threads.append(threads)
        if threads > 1:
            return FakeTiming(self.speedup, self.busy).probe(threads)
        return FakeTiming(self.lone_speedup).probe(threads)


def never_probe(threads: int) -> Bf16Probe:
    raise AssertionError("the probe must not run")


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A CPU with AVX512-BF16 named 'Test CPU', an empty cache of its own, no override, no earlier decision."""
    monkeypatch.setenv("HFPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(devices, "cpu_bf16_instructions", lambda: ["avx512_bf16"])
    monkeypatch.setattr(devices, "cpu_model", lambda: "Test CPU (cpu family 25, model 17, stepping 1)")
    monkeypatch.setattr(devices, "has_accelerator", lambda: False)
    monkeypatch.setattr(devices, "_DECIDED", {})


def forget_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a new process would start: only the cache file remembers."""
    monkeypatch.setattr(devices, "_DECIDED", {})


def test_bf16_clearly_faster_is_chosen() -> None:
    decision = cpu_bf16_decision(threads=2, probe=FakeTiming(2.0).probe)
    assert decision.bf16 is True
    assert "2.00x fp32's speed on 2 threads" in decision.reason and "bf16 autocast" in decision.reason
    assert f"cached in {cpu_bf16_cache_path()}" in decision.reason


def test_bf16_at_half_speed_is_refused() -> None:
    # The Intel Xeon with AVX512-BF16 and no AMX: bf16 matmul at 0.5x fp32.
    decision = cpu_bf16_decision(threads=2, probe=FakeTiming(0.5).probe)
    assert decision.bf16 is False
    assert "0.50x fp32's speed" in decision.reason and f"< {BF16_MIN_SPEEDUP}x): fp32" in decision.reason


@pytest.mark.parametrize(
    ("speedup", "bf16"), [(BF16_MIN_SPEEDUP + 0.001, True), (BF16_MIN_SPEEDUP - 0.01, False), (1.0, False)]
)
def test_the_threshold(speedup: float, bf16: bool) -> None:
    assert cpu_bf16_decision(threads=1, probe=FakeTiming(speedup).probe).bf16 is bf16


def test_cpu_without_bf16_instructions_is_fp32_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_bf16_instructions", lambda: [])
    monkeypatch.setattr(devices, "measure_cpu_bf16", never_probe)
    decision = cpu_bf16_decision(threads=2, probe=never_probe)
    assert decision.bf16 is False and "no bf16 instructions" in decision.reason
    assert device_defaults(cpu_bf16=True)["bf16"] is False
    assert not cpu_bf16_cache_path().exists()


def test_a_second_call_reads_the_cache_and_does_not_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CountingProbe(2.0)
    first = cpu_bf16_decision(threads=2, probe=probe)
    assert probe.threads == [2]
    assert cpu_bf16_decision(threads=2, probe=probe) == first  # the same process: no file read either
    forget_in_process(monkeypatch)
    again = cpu_bf16_decision(threads=2, probe=probe)
    assert probe.threads == [2] and again.bf16 is True
    assert f"probed earlier: {cpu_bf16_cache_path()}" in again.reason
    (key, entry), *others = json.loads(cpu_bf16_cache_path().read_text()).items()
    assert not others
    assert (
        key == f"Test CPU (cpu family 25, model 17, stepping 1) | avx512_bf16 | torch {torch.__version__} | 2 threads"
    )
    assert entry["bf16"] is True and entry["ratio"] == pytest.approx(2.0)


@pytest.mark.parametrize("change", ["cpu model", "torch version", "threads", "instructions"])
def test_another_cpu_torch_or_thread_count_probes_again(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_bf16_decision(threads=2, probe=CountingProbe(2.0))
    forget_in_process(monkeypatch)
    threads = 2
    if change == "cpu model":
        monkeypatch.setattr(devices, "cpu_model", lambda: "Intel(R) Xeon(R) (cpu family 6, model 85, stepping 11)")
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "99.0.0+cpu")
    elif change == "threads":
        threads = 1
    else:
        monkeypatch.setattr(devices, "cpu_bf16_instructions", lambda: ["avx512_bf16", "amx"])
    probe = CountingProbe(0.5)
    assert cpu_bf16_decision(threads=threads, probe=probe).bf16 is False
    assert probe.threads == [threads]
    assert len(json.loads(cpu_bf16_cache_path().read_text())) == 2  # both kept


def test_a_probe_disturbed_by_other_processes_is_decided_on_one_thread_and_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Measured here under load: 0.85x on 2 threads at 22% of them ours, 2.1x on 1 thread at the same time.
    probe = CountingProbe(0.85, busy=0.22, lone_speedup=2.1)
    decision = cpu_bf16_decision(threads=2, probe=probe)
    assert probe.threads == [2, 1] and decision.bf16 is True
    assert "2.10x fp32's speed on 1 thread" in decision.reason
    assert "other processes held the CPU" in decision.reason and "ours at 22%" in decision.reason
    assert "decided on 1 thread instead of 2; not cached" in decision.reason
    assert not cpu_bf16_cache_path().exists()
    assert cpu_bf16_decision(threads=2, probe=never_probe) == decision  # this process keeps its answer
    forget_in_process(monkeypatch)
    probe = CountingProbe(2.0)
    assert "cached in" in cpu_bf16_decision(threads=2, probe=probe).reason and probe.threads == [2]


def test_a_disturbed_probe_on_one_thread_decides_from_itself() -> None:
    timing = FakeTiming(2.0, busy=0.3)
    decision = cpu_bf16_decision(threads=1, probe=timing.probe)
    assert decision.bf16 is True and "ours at 30%; not cached" in decision.reason
    assert not cpu_bf16_cache_path().exists()


def test_an_unreadable_cache_is_probed_again_and_rewritten() -> None:
    path = cpu_bf16_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"half written')
    probe = CountingProbe(2.0)
    assert cpu_bf16_decision(threads=2, probe=probe).bf16 is True and probe.threads == [2]
    assert len(json.loads(path.read_text())) == 1


def test_an_unwritable_cache_still_decides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory\n")
    monkeypatch.setenv("HFPIPE_CACHE", str(tmp_path / "a_file"))
    decision = cpu_bf16_decision(threads=2, probe=CountingProbe(2.0))
    assert decision.bf16 is True and "not cached: " in decision.reason


def test_processes_probing_at_once_probe_once_and_agree() -> None:
    probe = CountingProbe(2.0)

    def slow_probe(threads: int) -> Bf16Probe:
        time.sleep(0.2)
        return probe(threads)

    decisions = []

    def decide() -> None:
        # Each thread stands for a process of one launch: its own lock file handle, no shared memory of decisions.
        decisions.append(devices._probed_or_cached(devices.cpu_bf16_cache_key(1), 1, slow_probe))

    workers = [threading.Thread(target=decide) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert probe.threads == [1]
    assert len({decision.bf16 for decision in decisions}) == 1


@pytest.mark.parametrize(("value", "bf16"), [("1", True), ("0", False)])
def test_the_environment_variable_forces_the_choice_without_probing(
    value: str, bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, value)
    monkeypatch.setattr(devices, "measure_cpu_bf16", never_probe)
    decision = cpu_bf16_decision(threads=2, probe=never_probe)
    assert decision.bf16 is bf16 and f"{CPU_BF16_ENV}={value}" in decision.reason
    assert device_defaults(cpu_bf16=True)["bf16"] is bf16
    monkeypatch.setattr(devices, "cpu_bf16_instructions", lambda: [])  # forced even without bf16 instructions
    assert cpu_bf16_decision(threads=2, probe=never_probe).bf16 is bf16


def test_a_bad_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="HFPIPE_CPU_BF16='yes': expected 0 .* or 1"):
        cpu_bf16_decision(threads=2, probe=never_probe)


@pytest.mark.parametrize(("speedup", "bf16"), [(2.0, True), (0.5, False)])
def test_device_defaults_follow_the_decision(speedup: float, bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CountingProbe(speedup)
    monkeypatch.setattr(devices, "measure_cpu_bf16", probe)
    defaults = device_defaults(cpu_bf16=True)
    assert defaults["bf16"] is bf16 and defaults.get("use_cpu", False) is bf16
    assert probe.threads == [run_threads(use_cpu=True)]
    assert device_defaults(cpu_bf16=True)["bf16"] is bf16 and len(probe.threads) == 1


def test_device_defaults_probe_only_for_cpu_bf16_without_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "measure_cpu_bf16", never_probe)
    assert device_defaults()["bf16"] is False  # pretraining and DPO: fp32 on CPU
    monkeypatch.setattr(devices, "has_accelerator", lambda: True)
    assert "use_cpu" not in device_defaults(cpu_bf16=True)


def test_the_probe_alternates_and_takes_the_median() -> None:
    timing = FakeTiming(2.0)
    steps = 0

    def step(bf16: bool) -> None:
        nonlocal steps
        steps += 1
        timing.step(bf16)
        if steps == 8:  # the third pair's bf16 step stalled: the median ignores it
            timing.now += 10 * FP32_STEP

    result = measure_cpu_bf16(1, step=step, clock=lambda: timing.now, cpu_clock=lambda: timing.now)
    assert result.ratio == pytest.approx(2.0)
    assert timing.order[:2] == [False, True]  # the warm-up
    pairs = [tuple(timing.order[index : index + 2]) for index in range(2, len(timing.order), 2)]
    assert len(pairs) == PROBE_PAIRS and pairs[:2] == [(False, True), (True, False)]


def test_the_probe_stops_at_its_time_budget() -> None:
    now = 0.0

    def slow_step(bf16: bool) -> None:
        nonlocal now
        now += 0.2

    result = measure_cpu_bf16(1, step=slow_step, clock=lambda: now, cpu_clock=lambda: now)
    assert result.seconds == pytest.approx(0.2 * (2 + 2 * PROBE_MIN_PAIRS))  # the warm-up, then the fewest pairs


@pytest.mark.parametrize(("threads", "steps"), [(2, 2 + 2), (1, 2 + 2 * PROBE_PAIRS)])
def test_a_disturbed_probe_stops_after_one_pair_only_on_several_threads(threads: int, steps: int) -> None:
    timing = FakeTiming(2.0, busy=0.3)
    result = timing.probe(threads)
    assert len(timing.order) == steps and result.utilisation == pytest.approx(0.3)


def test_the_real_probe_is_short_and_leaves_the_thread_count() -> None:
    before = torch.get_num_threads()
    result = measure_cpu_bf16(1)
    assert torch.get_num_threads() == before
    assert result.ratio > 0 and result.utilisation > 0
    assert result.seconds < 5  # about 0.5 s on one idle core; more when other processes share it


def test_run_threads_is_what_use_cpu_cores_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    before = torch.get_num_threads()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    assert run_threads(use_cpu=True) == 4
    assert run_threads(use_cpu=False) == before == torch.get_num_threads()  # nothing set
    probe = CountingProbe(2.0)
    cpu_bf16_decision(probe=probe)
    assert probe.threads == [4]
    try:
        assert use_cpu_cores(True) == 4
    finally:
        torch.set_num_threads(before)


def test_cpu_model_names_this_cpu() -> None:
    model = REAL_CPU_MODEL()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        name = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert model.startswith(name.partition(":")[2].strip()) and "cpu family" in model
    assert model
