"""How the process allocator treats the training step's activations (CPU).

Invariant: `retain_freed_memory()` only changes when freed memory goes back to the OS, never what
is computed; it is idempotent and a no-op where the C library is not glibc.

A CPU training step allocates and frees tens of activation and gradient buffers of a few MB each
(tiny preset, batch 256: 9.6 MB per (B, N, d) tensor). glibc serves blocks above its mmap
threshold with fresh mmap'd pages and returns them on free, so every step page-faults and zeroes
them again: measured 20-30% of the step's CPU time here. Raising the mmap threshold to its maximum
(32 MB), allowing no mmap'd blocks at all (larger buffers, e.g. 38 MB at batch 1024, come from the
heap too) and raising the trim threshold keeps those blocks in the heap for the next step to reuse.
The price: the process keeps its peak heap instead of shrinking after it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4   # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20                                    # glibc's upper limit on 64-bit
TRIM_THRESHOLD = 2**31 - 1                                       # (int) never trim below 2 GB free
TOP_PAD = 64 << 20                                               # grow the heap in 64 MB steps


@functools.cache
def retain_freed_memory() -> bool:
    """Serve every block from the heap and keep freed ones for reuse (glibc's mallopt); True when applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
                                                              (M_MMAP_MAX, 0),
                                                              (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                              (M_TOP_PAD, TOP_PAD)))
