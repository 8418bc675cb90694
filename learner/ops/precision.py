"""Which compute dtype a device trains in: the one place that decides bf16 autocast.

Invariant: bf16 autocast is chosen from what the hardware reports, never assumed: on CUDA always
(tensor cores), on a CPU only when it has native bf16 arithmetic (AVX-512 BF16 or AMX). On a CPU
without them (AVX2 only, like many development machines) bf16 is emulated and slower than fp32,
so the step runs in fp32 there.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of native bf16 on x86


def os_has_cpuinfo() -> bool:
    return os.path.exists("/proc/cpuinfo")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU does bf16 matmuls natively: torch dispatches AVX-512 (or AMX) kernels and the
    CPU reports avx512_bf16 or amx_bf16 (read from /proc/cpuinfo; elsewhere oneDNN's own check)."""
    capability = torch.backends.cpu.get_cpu_capability()        # "AVX2", "AVX512", "DEFAULT", ...
    if not capability.startswith(("AVX512", "AMX")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return any(flag in flags for flag in CPU_BF16_FLAGS)
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 where it is fast (CUDA, CPUs with native bf16), None (fp32) elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast_for(device: torch.device | str):
    """The autocast context a training or scoring step on `device` runs under (fp32 master weights)."""
    device = torch.device(device)
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
