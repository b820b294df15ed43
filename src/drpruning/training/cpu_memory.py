"""Training on a CPU: keep freed memory in the process instead of handing it back to the OS.

glibc's malloc serves large blocks with fresh mmap()s and unmaps them on free, so every activation, gradient
and logits tensor of every step is page-faulted (and zeroed by the kernel) anew. On a 2-core machine that is
about a third of a SmolLM2-135M training step, and it grows with every extra temporary (bench/bench_pruning.py).
Serving all blocks from the heap and never trimming it makes the second step reuse the first step's pages.
Only for CPU runs: on a GPU host, host memory that is never returned would pin e.g. a 7B state dict per rank.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_done = False


def keep_freed_memory() -> bool:
    """mallopt: no mmap()ed blocks, trim only above 2 GiB free at the top of the heap. True when applied
    (glibc on Linux); a no-op elsewhere. The process's peak memory is unchanged; it is just not returned."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if _done:
        log.info("CPU run: freed memory stays in the process heap (glibc mallopt), so steps reuse their pages")
    return _done
