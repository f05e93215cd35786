"""The C heap setting of processes that run model workers (`worker/heap.py`)."""

import os
import subprocess
import sys
import textwrap

import pytest

from dflash_ray.worker import heap

glibc = pytest.mark.skipif(not os.path.exists("/proc/self/statm") or
                           os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc on Linux only")

# Blocks of a step-tensor size, every other one freed (the rest live on, as tensors of the next
# step do): with glibc's dynamic mmap threshold the first free raises the threshold above the
# block size, the rest come from the heap, and the holes between live blocks stay resident.
CHURN = textwrap.dedent("""
    import ctypes, os
    from dflash_ray.worker import heap
    print("tuned" if heap.tune() else "untuned")
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
    print((rss() - before) >> 20)
""")


def churn(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHURN], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_tuned_heap_hands_freed_step_sized_blocks_back():
    state, kept_mib = churn({"DFLASH_HEAP": "tuned"})
    assert state == "tuned"
    assert kept_mib < 8, f"{kept_mib} MiB of the 75 MiB freed stayed resident"


@glibc
def test_glibc_settings_from_the_environment_are_left_alone():
    assert churn({"DFLASH_HEAP": "glibc"})[0] == "untuned"
    assert churn({"MALLOC_MMAP_THRESHOLD_": "131072"})[0] == "untuned"


def test_tune_runs_once_per_process(monkeypatch):
    monkeypatch.setattr(heap, "_done", True)
    assert heap.tune() is False
