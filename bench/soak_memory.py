"""Does the model server's memory grow with traffic? Waves of mixed requests (greedy, seeded
sampling, stop strings, streams abandoned after a few deltas) through the real `ModelServer` on
the shipped pair, in this process; after each wave the RSS and the engine's per-request tables
(which must be empty once the wave is done).

    python3 bench/soak_memory.py [--waves 10] [--per-wave 64] [--metrics none|prometheus|ray]
                                 [--out FILE]

`--metrics` adds the engine's metrics exporter with a backend: `prometheus` (prometheus_client,
as `LLM` uses it) or `ray` (`ray.util.metrics` in this process, a driver of a local Ray
instance, as a Serve replica records them).

Run it with different allocator settings to tell a leak from a cache filling up, e.g.
`ONEDNN_PRIMITIVE_CACHE_CAPACITY=8` (oneDNN keeps one primitive per GEMM shape it has seen) or
`DFLASH_OPS=ref` (no oneDNN packed path at all). Linux only (reads /proc/self/statm).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.server.model_server import ModelServer  # noqa: E402

KINDS = ("greedy", "seeded", "stop", "abandoned")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def params_of(kind: str, i: int) -> SamplingParams:
    if kind == "seeded":
        return SamplingParams(max_tokens=32, temperature=0.8, seed=i)
    if kind == "stop":
        return SamplingParams(max_tokens=32, stop=["\n\n", "def ", "xyz" * 5])
    return SamplingParams(max_tokens=64 if kind == "abandoned" else 32)


async def one(server: ModelServer, i: int, kind: str) -> None:
    stream = server.generate(f'def f{i}(x):\n    """Return', None, params_of(kind, i), f"r{i}")
    seen = 0
    async for _ in stream:
        seen += 1
        if kind == "abandoned" and seen == 3:  # the client goes away mid-stream
            break
    await stream.aclose()


def metrics_backend(kind: str):
    if kind == "prometheus":
        from dflash_ray.metrics.prometheus import PrometheusBackend
        return PrometheusBackend()
    if kind == "ray":
        import ray

        from dflash_ray.server.ray_metrics import RayBackend
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        return RayBackend()
    return None


async def soak(waves: int, per_wave: int, metrics: str = "none") -> dict:
    target, drafter = demo_pair()
    server = ModelServer({"target": target, "drafter": drafter, "max_num_seqs": 16}, "soak",
                         max_pending=4 * per_wave, metrics_backend=metrics_backend(metrics))
    engine, rows = server.engine, []
    for w in range(waves):
        start = time.perf_counter()
        await asyncio.gather(*(one(server, w * per_wave + k, KINDS[k % len(KINDS)])
                               for k in range(per_wave)))
        gc.collect()
        tables = {"seqs": len(engine._seqs), "errors": len(engine._errors),
                  "waiting_callers": len(engine._sync_waiting)}
        rows.append({"wave": w, "requests": (w + 1) * per_wave, "rss_mib": rss_mib(),
                     "seconds": round(time.perf_counter() - start, 2), **tables})
        print(f"wave {w}: {rows[-1]['requests']} requests in {rows[-1]['seconds']:.1f} s, "
              f"RSS {rows[-1]['rss_mib']:.0f} MiB, engine tables {tables}", flush=True)
    from dflash_ray.worker.heap import HEAP
    trims = {"mode": HEAP.mode, "trims": HEAP.trims, "trim_ms_mean":
             round(1e3 * HEAP.trim_seconds / HEAP.trims, 2) if HEAP.trims else None}
    print(f"heap: {trims}")
    before = rss_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the C heap holds free, handed back
    after = rss_mib()
    print(f"malloc_trim: RSS {before:.0f} -> {after:.0f} MiB")
    env_keys = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DFLASH_OPS", "DFLASH_HEAP", "MALLOC_ARENA_MAX")
    return {"metrics": metrics, "heap": trims, "env": {k: os.environ.get(k) for k in env_keys},
            "waves": rows, "rss_after_trim_mib": after}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waves", type=int, default=10)
    p.add_argument("--per-wave", type=int, default=64)
    p.add_argument("--metrics", choices=("none", "prometheus", "ray"), default="none")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = asyncio.run(soak(args.waves, args.per_wave, args.metrics))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
