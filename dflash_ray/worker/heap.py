"""The C heap of a process that runs model workers.

A CPU step allocates and frees tensors of many sizes from several threads (the stepping thread,
Ray's core-worker threads, the metrics exporter). glibc's malloc raises its mmap threshold each
time a large mmapped block is freed (up to 32 MiB on 64-bit), so after the first steps tensors of
a few MiB come from per-thread heaps instead of mmap, and what they leave free in those heaps is
not handed back: the process's RSS climbs under traffic and stays up when idle, although every
tensor was freed (measured in `docs/reliability.md`, "Memory under traffic"). A fixed threshold
keeps large blocks in mmap, returned to the OS at free; a cap on arenas bounds how many heaps
keep free memory.

`tune()` sets both through `mallopt` once per process, on glibc only, and leaves any setting the
user made through glibc's own environment variables (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_ARENA_MAX`) alone. `DFLASH_HEAP=glibc` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3

# bytes: blocks at least this large are mmapped and given back at free. glibc's starting value,
# made fixed; 256 KiB let the RSS climb as glibc's default does (the demo pair's step tensors
# are 128-256 KiB).
MMAP_THRESHOLD = 128 << 10

_done = False


def tune() -> bool:
    """Fix the mmap threshold and cap the arenas (once; True if this call set anything)."""
    global _done
    if _done:
        return False
    _done = True
    if os.environ.get("DFLASH_HEAP", "tuned") == "glibc":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = []
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        settings.append((_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = all(mallopt(param, value) == 1 for param, value in settings)
    if not ok:
        log.warning("mallopt refused a heap setting; the C heap keeps glibc's defaults")
    return ok and bool(settings)
