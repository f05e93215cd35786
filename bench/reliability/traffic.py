"""Sections that send ordinary traffic: `load` (many concurrent streams, each checked against a
lone request's greedy text), `storm` (streams abandoned mid-way, then the KV blocks must come
back) and `soak` (mixed traffic for minutes at a fixed concurrency, with the RSS trend)."""

from __future__ import annotations

import asyncio
import random
import time

from common import Outcome, Server, complete, rss_mib, summary, wait_idle

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def push(self, x):",
           "for i in range(10):"]


def greedy(prompt: str, max_tokens: int, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


async def references(client, max_tokens: int) -> dict[str, str]:
    """Each prompt's text when it runs alone (greedy: what every concurrent copy must say)."""
    refs = {}
    for p in PROMPTS:
        out = await complete(client, greedy(p, max_tokens))
        if out.status != 200:
            raise RuntimeError(f"the lone reference request failed: {out.status} {out.error}")
        refs[p] = out.text
    return refs


async def load(server: Server, streams: int = 200, max_tokens: int = 24) -> dict:
    async with server.client(timeout=600) as client:
        refs = await references(client, max_tokens)
        start = time.perf_counter()
        outs = await asyncio.gather(*(
            complete(client, greedy(PROMPTS[i % len(PROMPTS)], max_tokens), stream=True)
            for i in range(streams)))
        wall = time.perf_counter() - start
    correct = sum(o.status == 200 and o.done and o.error is None
                  and o.text == refs[PROMPTS[i % len(PROMPTS)]] for i, o in enumerate(outs))
    return {"streams": streams, "max_tokens": max_tokens, "completed": sum(o.done for o in outs),
            "correct_text": correct, "http_5xx": sum(o.status >= 500 for o in outs),
            "errors": sum(o.error is not None or o.status != 200 for o in outs),
            "wall_s": round(wall, 1), "latency": summary([o.seconds for o in outs])}


async def storm(server: Server, streams: int = 100, max_tokens: int = 256) -> dict:
    async with server.client(timeout=600) as client:
        outs = await asyncio.gather(*(
            complete(client, greedy(PROMPTS[i % len(PROMPTS)], max_tokens, ignore_eos=True),
                     stream=True, abandon_after=3) for i in range(streams)))
        after, seconds = await wait_idle(client)
    return {"abandoned": streams, "http_5xx": sum(o.status >= 500 for o in outs),
            "got_deltas": sum(bool(o.text) for o in outs),
            "kv_blocks_used_after": after["kv_blocks_used"],
            "kv_blocks_total": after["kv_blocks_total"], "running_after": after["running"],
            "seconds_to_free": round(seconds, 2)}


def mixed_request(rng: random.Random) -> tuple[dict, str, bool, int | None]:
    """(body, route, stream, abandon_after) of one soak request: greedy, seeded sampling, stop
    strings, streamed, chat, or a stream abandoned after two deltas."""
    p = rng.choice(PROMPTS)
    kind = rng.randrange(6)
    if kind == 0:
        return greedy(p, 32), "completions", False, None
    if kind == 1:
        return {"prompt": p, "max_tokens": 32, "temperature": 0.8, "seed": rng.randrange(99)}, \
            "completions", False, None
    if kind == 2:
        return greedy(p, 48, stop=["\n\n", "return", ")"]), "completions", False, None
    if kind == 3:
        return greedy(p, 32), "completions", True, None
    if kind == 4:
        return {"messages": [{"role": "user", "content": p}], "max_tokens": 24,
                "temperature": 0}, "chat/completions", True, None
    return greedy(p, 128, ignore_eos=True), "completions", True, 2


async def soak(server: Server, minutes: float = 3.0, concurrency: int = 16,
               sample_s: float = 10.0, progress=print) -> dict:
    """Mixed traffic for `minutes`; RSS of `server.pids` sampled every `sample_s` (and after
    the traffic stops and the server is idle again)."""
    deadline = time.monotonic() + minutes * 60
    outs: list[Outcome] = []
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            body, route, stream, abandon = mixed_request(rng)
            outs.append(await complete(client, body, route, stream, abandon))

    async def sampler() -> None:
        while time.monotonic() < deadline:
            if server.pids:
                samples.append((time.monotonic() - t0, sum(rss_mib(server.pids).values())))
                progress(f"  soak {samples[-1][0]:5.0f} s: {len(outs)} requests, RSS "
                         f"{samples[-1][1]:.0f} MiB")
            await asyncio.sleep(sample_s)

    async with server.client(timeout=600) as client:
        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        await wait_idle(client)
    idle_rss = sum(rss_mib(server.pids).values()) if server.pids else None
    bad = [o for o in outs if o.status != 200 or o.error is not None]
    result = {"minutes": minutes, "concurrency": concurrency, "requests": len(outs),
              "errors": len(bad), "http_5xx": sum(o.status >= 500 for o in outs),
              "error_samples": sorted({f"{o.status} {o.error}" for o in bad})[:5],
              "latency": summary([o.seconds for o in outs])}
    if samples:
        result["rss_mib"] = {"pids": server.pids, "first": round(samples[0][1]),
                             "last": round(samples[-1][1]),
                             "max": round(max(r for _, r in samples)),
                             "idle_after": round(idle_rss),
                             "slope_mib_per_min": round(slope(samples) * 60, 1),
                             # past the first fifth: the caches and arenas have grown by then
                             "slope_after_warmup_mib_per_min": round(slope(
                                 [(t, r) for t, r in samples if t >= minutes * 12]) * 60, 1),
                             "samples": [(round(t), round(r)) for t, r in samples]}
    return result


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) points, per unit of t (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0
