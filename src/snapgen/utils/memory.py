"""A process-wide CPU allocator setting for long CPU runs (training, benchmarks).

PyTorch's CPU tensors come from glibc's ``malloc``. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and unmaps it again on ``free``, so each training step's large
activations and gradients page-fault their memory in anew: the kernel zero-fills every 4 KiB page before
the first write. Attention backward at 16k tokens allocates several 30-100 MB blocks per call, and the
faulting showed up as 60-90 ms ``fill_``/``mul`` calls that take 5-10 ms once the memory is reused.
``benchmarks/attention.py`` measures both settings; PyTorch's CPU tuning guide suggests jemalloc or
tcmalloc for the same reason, neither of which installs from the package registries here.
"""

from __future__ import annotations

import ctypes
import platform
import sys

from .. import env

__all__ = ["retain_freed_memory", "ALLOCATOR_ENV"]

ALLOCATOR_ENV = "SNAPGEN_CPU_ALLOCATOR"  # "default" leaves glibc's settings alone (parsed by snapgen.env)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter numbers (malloc.h)
_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in this process for reuse instead of handing it back to the OS.

    Sets ``M_MMAP_MAX=0`` (large blocks come from the heap, not from one mmap each) and turns heap
    trimming off, so a block freed in one step is reused by the next without page faults. The cost: the
    process keeps its peak heap until it exits, which a training or benchmark process reaches every step
    anyway. Returns ``True`` when the setting is in effect; ``False`` (and nothing changed) on platforms
    without glibc or when the environment variable ``SNAPGEN_CPU_ALLOCATOR=default``. Idempotent.
    """
    global _applied
    if _applied:
        return True
    if env.cpu_allocator() == "default":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; order matters little, both are set before the next allocation
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _applied = ok
    return ok
