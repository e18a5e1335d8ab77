"""Keep freed CPU memory in the process for reuse (glibc's malloc), so that large tensors stop page-faulting.

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
`mmap` and unmaps it on free, and it returns freed memory at the top of the heap to the OS. A
256x256 view's FeatUp features are 100 MB per stage output, and the metric allocates such tensors
on every call, so each call page-faults (and the kernel zeroes) hundreds of megabytes again.
`tune_cpu_allocator()` turns that off: large blocks come from the heap and freed ones stay there,
so the next call reuses warm pages. Measured in docs/metric.md (one 256x256 view's DINO + FeatUp:
0.30 -> 0.21 s on a 2-core AMD EPYC). The cost: memory freed by the process is not given back to
the OS until it exits, and the heap can fragment (peak resident memory is reported next to the
timings). It changes the whole process, so the library never calls it on its own; the
`met3r-diffusers score` command does, on CPU (`--no-tune-allocator` keeps glibc's defaults).

The same effect without code: `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736` in the
environment of the process, or a different allocator (jemalloc, tcmalloc) through `LD_PRELOAD`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

__all__ = ["tune_cpu_allocator"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's documented defaults, restored by tune_cpu_allocator(False)
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
# never trim the heap: the largest value mallopt takes (an int)
_TUNED = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator(enable: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for reuse (`enable=False`: restore its default values).

    Returns True where the settings were applied, False where the C library is not glibc (macOS,
    Windows, musl), in which case nothing changes. Disabling also returns the free memory to the OS.
    """
    if not isinstance(enable, bool):
        raise ValueError(f"enable must be True or False, got {enable!r}")
    libc = _glibc()
    if libc is None:
        logger.info("tune_cpu_allocator: the C library is not glibc; allocator left as it is")
        return False
    settings = _TUNED if enable else _DEFAULTS
    applied = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings.items())
    if not enable:
        libc.malloc_trim(ctypes.c_size_t(0))
    if not applied:
        logger.warning("tune_cpu_allocator: glibc refused a mallopt setting; the allocator may be partly tuned")
    logger.debug("tune_cpu_allocator(%s): %s", enable, settings)
    return applied
