"""What this machine can run and what runs fast on it: precision defaults per device, the CPU bf16 decision (a short
measured probe, cached per CPU model), the checks of a config's precision keys, and CPU threads per process."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from hfpipe.errors import ConfigError

CPU_BF16_ENV = "HFPIPE_CPU_BF16"  # 0 or 1: skip the probe and force the choice (reproducible benchmarks)
# bf16 autocast is chosen on CPU when it runs the probe at least this many times fp32's speed. The probe is nearly all
# matmul; an SFT step also runs casts, elementwise ops, the fp32 loss and the optimizer, which bf16 does not speed up
# (2.1x in the probe was 1.9x per step on AMD EPYC), and bf16 rounds, so it must buy a clear gain. 1.2x leaves room
# for that and for the probe's noise, and is far from both machines measured (AMD EPYC 2.1x, Intel Xeon 0.5x).
BF16_MIN_SPEEDUP = 1.2
PROBE_SHAPE = (512, 1024, 1024)  # rows x in-features x out-features of the probe's linear layer, as in an SFT step
PROBE_PAIRS = 7  # alternating fp32/bf16 pairs at most ...
PROBE_MIN_PAIRS = 3  # ... and at least, past the time budget
PROBE_BUDGET_SECONDS = 0.5
# Below this share of the probe's threads kept busy, other processes had the cores and the threads' ratio is noise
# (0.85-2.9x measured here under load): a one-thread probe decides that run, and nothing is cached.
PROBE_MIN_UTILISATION = 0.7
CPU_BF16_CACHE = "cpu_bf16.json"


def cuda_bf16_available() -> bool:
    """True when a CUDA GPU that computes in bfloat16 is present."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def has_accelerator() -> bool:
    """True when torch sees a GPU (CUDA, ROCm, XPU) or Apple MPS device."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or bool(mps and mps.is_available())


def cpu_bf16_instructions() -> list[str]:
    """The CPU's bfloat16 instruction sets torch detects: 'avx512_bf16', 'amx', both or none."""
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}  # torch.cpu's (private)
    return [name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    return bool(cpu_bf16_instructions())


def cpu_model() -> str:
    """The CPU model: /proc/cpuinfo's model name with its family, model and stepping, else platform's name for it."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():  # the end of the first processor's block
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    # A hypervisor may report only "AMD EPYC" for every generation: the numbers tell them apart.
    numbers = [f"{field} {fields[field]}" for field in ("cpu family", "model", "stepping") if field in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


@dataclass(frozen=True)
class Bf16Probe:
    """One probe's result: `ratio` is fp32 time over bf16-autocast time (above 1: bf16 is faster); `utilisation` is
    our CPU time over wall time x threads (well below 1: other processes had the cores)."""

    ratio: float
    seconds: float
    utilisation: float


@dataclass(frozen=True)
class CpuBf16Decision:
    """Whether SFT on this CPU trains under bf16 autocast, and why (one line, for the setup line or `hfpipe check`)."""

    bf16: bool
    reason: str


def _linear_step() -> Callable[[bool], None]:
    """A linear layer's forward (fp32 or under bf16 autocast) and backward, the bulk of an SFT step's work."""
    rows, inner, outer = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(rows, inner, generator=generator).requires_grad_()
    weight = (torch.randn(outer, inner, generator=generator) * inner**-0.5).requires_grad_()
    bias = torch.zeros(outer, requires_grad=True)

    def step(bf16: bool) -> None:
        # Autocast is entered per step, as the Trainer does, so the weight is cast to bf16 each time.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = torch.nn.functional.linear(inputs, weight, bias)
        torch.autograd.grad(output.sum(), (inputs, weight, bias))

    return step


def measure_cpu_bf16(
    threads: int,
    step: Callable[[bool], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> Bf16Probe:
    """Time `step` (default: a linear layer's forward and backward, PROBE_SHAPE) in fp32 and under bf16 autocast,
    alternately, on `threads` torch threads; return the median of the pairs' time ratios. Well under a second.

    On more than one thread, a probe whose first pair shows other processes holding the cores stops there (its
    ratio is not used: `cpu_bf16_decision` probes one thread instead).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step = step or _linear_step()
        start = clock()
        step(False)  # the first calls allocate and set up kernels
        step(True)
        timed, cpu_timed = clock(), cpu_clock()
        ratios: list[float] = []
        utilisation = 1.0
        while len(ratios) < PROBE_PAIRS and (len(ratios) < PROBE_MIN_PAIRS or clock() - start < PROBE_BUDGET_SECONDS):
            seconds = {}
            for bf16 in (False, True) if len(ratios) % 2 == 0 else (True, False):  # either may run first
                begin = clock()
                step(bf16)
                seconds[bf16] = clock() - begin
            ratios.append(seconds[False] / max(seconds[True], 1e-9))
            utilisation = (cpu_clock() - cpu_timed) / max((clock() - timed) * threads, 1e-9)
            if threads > 1 and utilisation < PROBE_MIN_UTILISATION:
                break
        wall = clock() - start
    finally:
        torch.set_num_threads(previous)
    return Bf16Probe(ratio=statistics.median(ratios), seconds=wall, utilisation=utilisation)


def cpu_bf16_cache_path() -> Path:
    """The file that keeps the CPU bf16 probe's results, under hfpipe's cache root."""
    # data.files.cache_root's rule, repeated: that module imports datasets, too heavy for parsing a config.
    configured = os.environ.get("HFPIPE_CACHE")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "hfpipe"
    return root / CPU_BF16_CACHE


def cpu_bf16_cache_key(threads: int) -> str:
    """What the probe's result depends on: the CPU model and its bf16 instructions, torch's version, the threads."""
    instructions = "+".join(cpu_bf16_instructions()) or "no bf16 instructions"
    return f"{cpu_model()} | {instructions} | torch {torch.__version__} | {threads} threads"


@contextmanager
def _cache_locked(path: Path) -> Iterator[None]:
    """Hold an OS lock beside the cache file, so that the processes of one launch probe once and agree (the others
    wait, then read the result); without a lock (no fcntl, unwritable cache dir) go on unlocked."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a", encoding="utf-8")  # noqa: SIM115 (held until the with block ends)
    except (ImportError, OSError):
        yield
        return
    with handle:
        with suppress(OSError):  # a file system without locks (some NFS mounts): unlocked
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> str | None:
    """Add `entry` under `key` (the file replaced whole, never half-written); the error, if it could not be."""
    entries = _read_cache(path)
    entries[key] = entry
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        return f"{type(error).__name__}: {error.strerror or error}"
    return None


def _measured(bf16: bool, ratio: float, threads: int) -> str:
    choice = "bf16 autocast" if bf16 else "fp32"
    return (
        f"bf16 autocast ran {ratio:.2f}x fp32's speed on {threads} thread{'s' * (threads != 1)} "
        f"({'>=' if bf16 else '<'} {BF16_MIN_SPEEDUP}x): {choice}"
    )


_DECIDED: dict[str, CpuBf16Decision] = {}  # this process's decisions, by cache key


def cpu_bf16_decision(threads: int | None = None, probe: Callable[[int], Bf16Probe] | None = None) -> CpuBf16Decision:
    """Decide whether SFT on this CPU (no accelerator) trains under bf16 autocast, and say why.

    HFPIPE_CPU_BF16=0/1 forces the choice. A CPU without bf16 instructions is fp32, not probed. Otherwise a short
    probe (`measure_cpu_bf16`, or `probe`) on the threads the run will use (`run_threads`) decides: bf16 at
    >= BF16_MIN_SPEEDUP times fp32's speed. The result is cached per CPU model, torch version and thread count in
    `cpu_bf16_cache_path` (delete the file to probe again), unless other processes held the CPU during the probe:
    then a probe on one thread decides this run only. Within one process the first answer stands, so that every
    stage and check of a pipeline agrees.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ConfigError(f"{CPU_BF16_ENV}={forced!r}: expected 0 (fp32) or 1 (bf16 autocast), or unset (probe).")
        choice = "bf16 autocast" if forced == "1" else "fp32"
        return CpuBf16Decision(forced == "1", f"{CPU_BF16_ENV}={forced}: {choice}, not probed")
    if not cpu_has_native_bf16():
        return CpuBf16Decision(False, "no bf16 instructions (AVX512-BF16 or AMX) on this CPU: fp32, not probed")
    threads = threads or run_threads(use_cpu=True)
    key = cpu_bf16_cache_key(threads)
    if key not in _DECIDED:
        _DECIDED[key] = _probed_or_cached(key, threads, probe or measure_cpu_bf16)
    return _DECIDED[key]


def _probed_or_cached(key: str, threads: int, probe: Callable[[int], Bf16Probe]) -> CpuBf16Decision:
    path = cpu_bf16_cache_path()
    with _cache_locked(path):
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("bf16"), bool) and type(entry.get("ratio")) in (int, float):
            reason = _measured(entry["bf16"], float(entry["ratio"]), threads)
            return CpuBf16Decision(entry["bf16"], f"{reason} (probed earlier: {path})")
        result = probe(threads)
        if result.utilisation >= PROBE_MIN_UTILISATION:
            bf16 = result.ratio >= BF16_MIN_SPEEDUP
            entry = {"bf16": bf16, "ratio": round(result.ratio, 3), "probe_seconds": round(result.seconds, 3)}
            error = _write_cache(path, key, entry)
            cached = f"not cached: {error}" if error else f"cached in {path}"
            return CpuBf16Decision(
                bf16, f"{_measured(bf16, result.ratio, threads)} (a {result.seconds:.2f} s probe, {cached})"
            )
        disturbed = (
            f"other processes held the CPU during a {result.seconds:.2f} s probe, ours at {result.utilisation:.0%}"
        )
        if threads > 1:
            # A lone thread waits for no other at each matmul: under load its ratio stayed near the truth (1.9-2.4x
            # here, against 0.85-2.9x on 2 threads), so it decides this run.
            disturbed += f"; decided on 1 thread instead of {threads}"
            result, threads = probe(1), 1
        bf16 = result.ratio >= BF16_MIN_SPEEDUP
        return CpuBf16Decision(bf16, f"{_measured(bf16, result.ratio, threads)} ({disturbed}; not cached)")


def device_defaults(cpu_bf16: bool = False) -> dict[str, object]:
    """Precision and loader defaults that work and are fast on this machine.

    bf16 on a GPU that has it. On CPU fp32, except with `cpu_bf16` where `cpu_bf16_decision` measured bf16 autocast
    clearly faster: on AMD EPYC with AVX512-BF16 it made an SFT step 1.9x faster (benchmarks/README.md), while on an
    Intel Xeon with AVX512-BF16 and no AMX bf16 matmul ran at half fp32 speed.
    """
    on_gpu = torch.cuda.is_available()
    defaults: dict[str, object] = {"bf16": cuda_bf16_available(), "fp16": False, "dataloader_pin_memory": on_gpu}
    if cpu_bf16 and not has_accelerator() and cpu_bf16_decision().bf16:
        defaults.update(bf16=True, use_cpu=True)
    return defaults


def resolve_device_settings(values: dict[str, object], where: str) -> None:
    """Stop on a precision setting this machine cannot run, before anything is loaded; on a machine with no
    accelerator, set use_cpu so that CPU runs (DDP with gloo included) are set up as such."""
    if values.get("bf16") and values.get("fp16"):
        raise ConfigError(f"{where}: bf16 and fp16 are both true; keep one (or neither: hfpipe picks per device).")
    if values.get("bf16") and not values.get("use_cpu") and not cuda_bf16_available():
        raise ConfigError(
            f"{where}: bf16: true needs a GPU with bfloat16 support and none was found. Remove the key "
            "(hfpipe picks bf16 on such GPUs, fp32 on CPU) or add use_cpu: true for slow CPU autocast."
        )
    if values.get("fp16") and not torch.cuda.is_available():
        raise ConfigError(f"{where}: fp16: true needs a CUDA GPU and none was found. Remove the key.")
    if not has_accelerator():
        # Without it, torchrun on a CPU-only machine starts independent, unsynchronised processes.
        values["use_cpu"] = True


def run_threads(use_cpu: bool) -> int:
    """The torch thread count a run in this process will train with (what `use_cpu_cores` sets), setting nothing.

    `accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1, which halves speed on a 2-core machine: a CPU run
    then gets its process's share of the physical cores. `accelerate launch --cpu` (or any other OMP_NUM_THREADS)
    keeps torch's own count.
    """
    launched_for_gpu = os.environ.get("ACCELERATE_USE_CPU") == "False" and os.environ.get("OMP_NUM_THREADS") == "1"
    if use_cpu and launched_for_gpu:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return torch.get_num_threads()


def use_cpu_cores(use_cpu: bool) -> int:
    """Give each local process its share of the physical cores on a CPU run (`run_threads`); return torch's thread
    count."""
    threads = run_threads(use_cpu)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
