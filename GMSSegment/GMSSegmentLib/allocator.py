"""Keep freed memory inside the process (glibc malloc) instead of handing it back to the kernel after every tensor.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed. A batch of 16 images at 256 px makes activations of 100-300 MB, so every layer of every batch
faulted its pages in anew and the kernel zeroed them: on a 2-core Xeon, encoding and decoding such a batch in bf16
spent 40 % of its CPU time in the kernel (2.8 million page faults per 3 batches) and ran 2.37 times slower than with
the memory kept; fp32 inference batches of 8 at 224 px ran 1.25 times slower (side by side:
``python benchmarks/allocator_cost.py --weights-dir ../shared/models``). ``keep_freed_memory``
switches ``mmap`` off for large blocks and lets the heap keep up to ``trim`` bytes of free memory at its top, so the
next batch reuses the same pages.

The CLI (and so the worker process Slicer launches) calls it at start-up; ``GMS_MALLOC_TUNING=0`` leaves glibc's
defaults. Elsewhere (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # mallopt parameters of glibc's malloc.h

_done: bool | None = None


def keep_freed_memory(trim: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Tune glibc's malloc once per process; returns whether the tuning is in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("GMS_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts and ignores everything
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, trim) and mallopt(M_TOP_PAD, top_pad))
    return _done


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the kernel (glibc ``malloc_trim``), e.g. when a warm worker waits for its
    next job after a large volume; True when something was released. Elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
