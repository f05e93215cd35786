"""The C heap of a process that runs model workers.

A CPU step allocates and frees tensors of many sizes from several threads (the stepping thread,
Ray's core-worker threads, the metrics exporter). glibc's malloc raises its mmap threshold each
time a large mmapped block is freed (up to 32 MiB on 64-bit), so after the first steps the step
tensors (128-256 KiB on the shipped pair) come from the per-thread heaps instead of mmap, and the
holes they leave between live blocks are not handed back: the RSS climbs under traffic and stays
up when idle, although every tensor was freed (`docs/reliability.md`, "The C heap").

Two cures, chosen with `DFLASH_HEAP`:
- `trim` (the default): every `TRIM_S` of stepping, `malloc_trim(0)` hands the free pages inside
  every heap back to the OS. It costs a few milliseconds each time, nothing per allocation.
- `mmap`: the mmap threshold fixed at 128 KiB (glibc's starting value), so those tensors are
  mmapped and unmapped at free; bounded too, but every step pays the page faults of its tensors.
- `glibc` leaves glibc alone, as do glibc's own environment variables (`MALLOC_MMAP_THRESHOLD_`
  keeps `mmap` from touching the threshold).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger(__name__)

MODES = ("trim", "mmap", "glibc")
TRIM_S = 2.0  # seconds of stepping between trims
MMAP_THRESHOLD = 128 << 10  # bytes, for `mmap`
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


class _Heap:
    def __init__(self):
        self.mode: str | None = None  # None: not set up yet
        self.libc = None
        self.last_trim = time.monotonic()
        self.trims = 0
        self.trim_seconds = 0.0

    def setup(self) -> str:
        if self.mode is not None:
            return self.mode
        mode = os.environ.get("DFLASH_HEAP", "trim")
        if mode not in MODES:
            raise ValueError(f"DFLASH_HEAP={mode!r}: expected one of {', '.join(MODES)}")
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to do
            mode = "glibc"
        else:
            self.libc = libc
        if (mode == "mmap" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
                and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1):
            log.warning("mallopt refused the mmap threshold; the heap keeps glibc's")
        self.mode = mode
        return mode

    def tick(self) -> None:
        if self.mode != "trim":
            return
        now = time.monotonic()
        if now - self.last_trim >= TRIM_S:
            self.trim()

    def trim(self) -> None:
        start = time.monotonic()
        self.libc.malloc_trim(0)
        self.last_trim = time.monotonic()
        self.trims += 1
        self.trim_seconds += self.last_trim - start


HEAP = _Heap()


def setup() -> str:
    """Apply `DFLASH_HEAP` once per process (a worker's construction calls it); the mode."""
    return HEAP.setup()


def tick() -> None:
    """Once per step: trim when `TRIM_S` have passed since the last trim (mode `trim`)."""
    HEAP.tick()
