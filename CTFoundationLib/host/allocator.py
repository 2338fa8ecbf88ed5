"""glibc allocator settings for the processes that run the models (the CLI and the Slicer worker, never Slicer).

glibc serves every block above its mmap threshold (32 MB at most) with fresh pages and unmaps it on free, so each
large activation of a CT-sized forward pass (CTViT's feed-forward buffer is 151 MB) is page-faulted and zeroed
anew: about 1 s of a 6 s full-size CT-CLIP image encode on 2 cores. Serving large blocks from the heap and keeping
freed memory for reuse removes that cost (PyTorch's CPU tuning guide reaches the same end with jemalloc/tcmalloc).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
RETAIN_BYTES = 1 << 30  # blocks up to this size come from the heap; this much freed memory is kept for reuse


def reuse_freed_memory(retain_bytes: int = RETAIN_BYTES) -> bool:
    """Apply the settings on Linux with glibc; True when they took effect (False elsewhere, harmlessly)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, retain_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, retain_bytes))


def trim_freed_memory() -> bool:
    """Give freed heap memory back to the system now (after models are unloaded: the settings above keep up to
    `RETAIN_BYTES` for reuse otherwise); True when glibc did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    return bool(malloc_trim(0))
