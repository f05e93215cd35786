"""The C heap of processes that run model workers (`worker/heap.py`): freed step tensors go back
to the OS."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from dflash_ray.worker import heap

glibc = pytest.mark.skipif(not os.path.exists("/proc/self/statm") or
                           os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc on Linux only")

# Blocks of a step-tensor size, every other one freed (the rest live on, as tensors of the next
# step do): with glibc's dynamic mmap threshold the first free raises the threshold above the
# block size, the rest come from the heap, and the holes between live blocks stay resident.
# Prints the mode and the MiB of the freed half still resident (after a trim in mode `trim`).
CHURN = textwrap.dedent("""
    import ctypes, os
    from dflash_ray.worker import heap
    mode = heap.setup()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    size = 192 << 10
    libc.free(libc.malloc(size))
    before = rss()
    blocks = []
    for _ in range(800):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)  # resident
        blocks.append(p)
    for p in blocks[::2]:
        libc.free(p)
    before += 400 * size  # what the live half holds
    if mode == "trim":
        heap.HEAP.trim()
    print(mode, (rss() - before) >> 20)
""")


def churn(env: dict) -> tuple[str, int]:
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[-2], int(out[-1])


@glibc
@pytest.mark.parametrize("mode", ["trim", "mmap"])
def test_freed_step_sized_blocks_go_back_to_the_os(mode):
    got, kept_mib = churn({"DFLASH_HEAP": mode})
    assert got == mode
    assert kept_mib < 8, f"{mode}: {kept_mib} MiB of the 75 MiB freed stayed resident"


@glibc
def test_glibc_mode_leaves_the_heap_alone():
    assert churn({"DFLASH_HEAP": "glibc"})[0] == "glibc"


def test_a_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("DFLASH_HEAP", "jemalloc")
    with pytest.raises(ValueError, match="DFLASH_HEAP='jemalloc'"):
        heap._Heap().setup()


@glibc
def test_tick_trims_once_per_interval():
    h = heap._Heap()
    h.mode = "trim"
    h.setup()  # already set up: keeps the mode
    import ctypes
    h.libc = ctypes.CDLL("libc.so.6")
    h.last_trim = time.monotonic() - heap.TRIM_S - 1
    h.tick()
    h.tick()  # right after: not due
    assert h.trims == 1
