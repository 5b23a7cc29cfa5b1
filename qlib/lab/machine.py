"""What machine a number came from: the CPU's model and the SIMD/AMX flags that decide which kernels run.

Importing this module does not import torch, so the environment doctor can read the CPU even where torch is broken.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

X86_KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
ARM_KERNEL_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve")


def kernel_flags() -> tuple[str, ...]:
    """The CPU flags that decide which quantized kernels run on this architecture (x86 or ARM)."""
    return ARM_KERNEL_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else X86_KERNEL_FLAGS


def read_cpuinfo(path: str | Path = "/proc/cpuinfo", names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """CPU model and the kernel flags ``names`` (default ``kernel_flags()``) from /proc/cpuinfo; empty fields if absent."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.split("\n\n")[0].splitlines():  # the first processor: every core of one CPU says the same
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, "source": str(path) if text else None,
            "flags": {f: f in flags for f in (names or kernel_flags())}}


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_info() -> dict:
    """The CPU model, core counts, kernel flags and torch's view of them (what a result records)."""
    import torch

    proc = read_cpuinfo(names=X86_KERNEL_FLAGS)
    return {
        "model_name": proc["model"],
        "logical_cores": os.cpu_count(),
        "available_cores": available_cores(),
        "flags": proc["flags"],
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
