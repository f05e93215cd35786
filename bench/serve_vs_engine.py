"""HTTP streaming through Ray Serve vs the same engine in-process, side by side in one run.

Closed loop at each concurrency c: c clients each send streaming completions back to back.
Reports output tok/s, TTFT and inter-token latency (p50/p99), and the Serve / in-process ratio.

    python3 bench/serve_vs_engine.py --demo [--concurrency 1 8 32] [--requests 32]
    python3 bench/serve_vs_engine.py --target DIR --drafter DIR
    python3 bench/serve_vs_engine.py --demo --direct-streaming  # + the one-deployment app
    python3 bench/serve_vs_engine.py --demo --concurrency 8 8 8 --stream-items  # pushed vs items
"""

from __future__ import annotations

import os

# Same threading as the Serve replicas (runtime_env in the app): one torch thread. Two spinning
# OpenMP threads beside Ray's processes on 2 cores slow the in-process side several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import asyncio
import json
import socket
import statistics
import time

import httpx

from dflash_ray import SamplingParams
from dflash_ray.config import EngineConfig
from dflash_ray.core.engine import Engine  # noqa: E402
from dflash_ray.executors import make_engine
from dflash_ray.server import serve_env


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Recorder:
    def __init__(self):
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0

    def request(self, start: float, arrivals: list[tuple[float, int]]) -> None:
        """arrivals: (time, tokens in that chunk) of the non-empty chunks."""
        if not arrivals:
            return
        self.ttft.append(arrivals[0][0] - start)
        for (t0, _), (t1, n) in zip(arrivals, arrivals[1:], strict=False):
            self.itl.append((t1 - t0) / n)  # per token: the gap spread over the chunk
        self.tokens += sum(n for _, n in arrivals)

    def summary(self, seconds: float) -> dict:
        return {"tok_s": self.tokens / seconds, "ttft_p50_ms": 1000 * pct(self.ttft, 0.5),
                "ttft_p99_ms": 1000 * pct(self.ttft, 0.99),
                "itl_p50_ms": 1000 * pct(self.itl, 0.5), "itl_p99_ms": 1000 * pct(self.itl, 0.99)}


async def closed_loop(one, prompts: list[str], concurrency: int) -> float:
    queue = list(prompts)

    async def client():
        while queue:
            await one(queue.pop())

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start


async def run_engine(engine: Engine, prompts, concurrency, max_tokens) -> dict:
    rec = Recorder()

    async def one(prompt):
        start, arrivals = time.perf_counter(), []
        async for out in engine.stream(prompt, SamplingParams(max_tokens=max_tokens,
                                                              ignore_eos=True)):
            if out.new_token_ids:
                arrivals.append((time.perf_counter(), len(out.new_token_ids)))
        rec.request(start, arrivals)

    seconds = await closed_loop(one, prompts, concurrency)
    return rec.summary(seconds)


async def run_http(base: str, prompts, concurrency, max_tokens) -> dict:
    rec = Recorder()
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(prompt):
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            start, times, total = time.perf_counter(), [], 0
            async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        total = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())
            # SSE chunks carry text, not token counts: spread the usage total over them
            per = total / len(times) if times else 0
            rec.request(start, [(t, per) for t in times])

        seconds = await closed_loop(one, prompts, concurrency)
    return rec.summary(seconds)


def engine_model_seconds(engine: Engine) -> float:
    s = engine.stats().counters
    return s.draft_seconds + s.verify_seconds


def server_model_seconds(base: str) -> float:
    return httpx.get(f"{base}/stats", timeout=30).json()["model_seconds"]


def model_time(model_seconds, run) -> dict:
    """The summary of coroutine `run`, plus its wall time and the engine's time in the model's
    passes over it. The same steps taking longer through Serve means the engine was slowed (CPU
    shared with the ingress, the proxy, the client); more wall than model time means it waited
    for requests."""
    before, start = model_seconds(), time.perf_counter()
    summary = asyncio.run(run)
    wall = time.perf_counter() - start
    return summary | {"wall_s": wall, "model_s": model_seconds() - before}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--spec-min-confidence", type=float, default=None,
                    help="engine setting for both sides (deployments/dflash.yaml uses 0.1)")
    ap.add_argument("--spec-max-batch", type=int, default=None,
                    help="engine setting for both sides (deployments/dflash.yaml uses 2)")
    ap.add_argument("--direct-streaming", action="store_true",
                    help="also measure the app with direct_streaming (the model replica serves "
                    "HTTP itself), side by side")
    ap.add_argument("--stream-items", action="store_true",
                    help="also measure the app with push_streams off (every delta one Serve "
                    "stream item over gRPC, the default before pushed streams), side by side")
    ap.add_argument("--ray-serve-defaults", action="store_true",
                    help="run Serve as it comes: without dflash_ray/server/serve_env.py's "
                    "settings and with the ingress reading streams as Ray objects (the A/B)")
    ap.add_argument("--stream-interval", type=int, default=None,
                    help="engine setting for both sides: tokens per streamed delta (default 1)")
    return ap


def run(args: argparse.Namespace) -> dict:
    """Start a local Ray and Serve, measure every concurrency level, shut both down."""
    if args.demo:
        from dflash_ray.demo import demo_pair

        args.target, args.drafter = demo_pair()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not args.ray_serve_defaults:
        serve_env.apply()  # Serve's streaming settings, as the deployments run them
    from dflash_ray.benchmark.prompts import bench_prompts

    prompts = bench_prompts(args.target, args.requests)
    engine_cfg = {"target": args.target, "drafter": args.drafter, "max_num_seqs": 64}
    for key in ("spec_min_confidence", "spec_max_batch", "stream_interval"):
        if getattr(args, key) is not None:
            engine_cfg[key] = getattr(args, key)

    import ray
    from ray import serve

    from dflash_ray.server.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = {"engine": engine_cfg, "grpc_streams": not args.ray_serve_defaults,
           "push_streams": not args.ray_serve_defaults}
    serve.run(build_app(app), name="bench", route_prefix="/")
    if args.stream_items:
        serve.run(build_app({**app, "push_streams": False}), name="items",
                  route_prefix="/items")
    if args.direct_streaming:
        serve.run(build_app({**app, "direct_streaming": True}), name="direct",
                  route_prefix="/direct")
    base = f"http://127.0.0.1:{port}"
    engine = make_engine(EngineConfig(**engine_cfg))
    rows = []
    try:
        for c in args.concurrency:
            local = model_time(lambda: engine_model_seconds(engine),
                               run_engine(engine, prompts, c, args.max_tokens))
            http = model_time(lambda: server_model_seconds(base),
                              run_http(base, prompts, c, args.max_tokens))
            rows.append({"concurrency": c, "in_process": local, "serve": http,
                         "ratio": http["tok_s"] / local["tok_s"]})
            if args.stream_items:
                items = asyncio.run(run_http(f"{base}/items", prompts, c, args.max_tokens))
                rows[-1] |= {"items": items, "items_ratio": items["tok_s"] / local["tok_s"]}
                print(f"c={c:>2}: stream items {items['tok_s']:.0f} tok/s "
                      f"({items['tok_s'] / local['tok_s']:.0%}); ITL p50/p99 "
                      f"{items['itl_p50_ms']:.1f}/{items['itl_p99_ms']:.1f} ms", flush=True)
            if args.direct_streaming:
                direct = asyncio.run(run_http(f"{base}/direct", prompts, c, args.max_tokens))
                rows[-1] |= {"direct": direct, "direct_ratio": direct["tok_s"] / local["tok_s"]}
                print(f"c={c:>2}: direct streaming {direct['tok_s']:.0f} tok/s "
                      f"({direct['tok_s'] / local['tok_s']:.0%}); TTFT p50/p99 "
                      f"{direct['ttft_p50_ms']:.0f}/{direct['ttft_p99_ms']:.0f} ms, ITL p50/p99 "
                      f"{direct['itl_p50_ms']:.1f}/{direct['itl_p99_ms']:.1f} ms", flush=True)
            print(f"c={c:>2}: in-process {local['tok_s']:.0f} tok/s, Serve {http['tok_s']:.0f} "
                  f"tok/s ({http['tok_s'] / local['tok_s']:.0%}); Serve TTFT p50/p99 "
                  f"{http['ttft_p50_ms']:.0f}/{http['ttft_p99_ms']:.0f} ms, ITL p50/p99 "
                  f"{http['itl_p50_ms']:.1f}/{http['itl_p99_ms']:.1f} ms; in-process TTFT p50 "
                  f"{local['ttft_p50_ms']:.0f} ms, ITL p50 {local['itl_p50_ms']:.1f} ms; in the "
                  f"model's passes {local['model_s']:.2f} s of {local['wall_s']:.2f} in-process, "
                  f"{http['model_s']:.2f} s of {http['wall_s']:.2f} through Serve", flush=True)
        # the model server's counters: steps, and how many frames carried the pushed deltas
        server_stats = httpx.get(f"{base}/stats", timeout=30).json()
    finally:
        engine.shutdown()
        serve.shutdown()
        ray.shutdown()
    shown = {k: (os.path.relpath(v) if k in ("target", "drafter") and v else v)
             for k, v in vars(args).items()}
    return {"args": shown, "rows": rows, "server_stats": server_stats}


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"mean Serve / in-process ratio: "
          f"{statistics.mean(r['ratio'] for r in result['rows']):.2f}")


if __name__ == "__main__":
    main()
