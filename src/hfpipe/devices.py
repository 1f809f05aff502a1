"""What this machine can run and what runs fast on it: precision defaults per device, the checks of a config's
precision keys, and CPU threads per process."""

from __future__ import annotations

import os

import torch

from hfpipe.errors import ConfigError


def cuda_bf16_available() -> bool:
    """True when a CUDA GPU that computes in bfloat16 is present."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def has_accelerator() -> bool:
    """True when torch sees a GPU (CUDA, ROCm, XPU) or Apple MPS device."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or bool(mps and mps.is_available())


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private names)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def device_defaults(cpu_bf16: bool = False) -> dict[str, object]:
    """Precision and loader defaults that work and are fast on this machine.

    bf16 on a GPU that has it. On CPU fp32, except with `cpu_bf16` on a CPU with native bf16 instructions: there
    bf16 autocast made an SFT step 1.4x faster (benchmarks/README.md); without them it runs at about half fp32 speed.
    """
    on_gpu = torch.cuda.is_available()
    defaults: dict[str, object] = {"bf16": cuda_bf16_available(), "fp16": False, "dataloader_pin_memory": on_gpu}
    if cpu_bf16 and not has_accelerator() and cpu_has_native_bf16():
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


def use_cpu_cores(use_cpu: bool) -> int:
    """Give each local process its share of the physical cores on a CPU run; return torch's thread count.

    `accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1, which halves speed on a 2-core machine;
    `accelerate launch --cpu` (or any other OMP_NUM_THREADS) is left as it is.
    """
    launched_for_gpu = os.environ.get("ACCELERATE_USE_CPU") == "False" and os.environ.get("OMP_NUM_THREADS") == "1"
    if use_cpu and launched_for_gpu:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return torch.get_num_threads()
