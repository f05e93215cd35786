"""The `kills` section (only with --allow-kills): under load, SIGKILL the drafter actor, then a
target shard actor, then the model-server replica, found by their process titles among the
processes the suite started (or the pids it was given), and count what each kill cost: requests
lost (an error, or greedy text that differs from a lone request's) and seconds to recover
(drafter: until /stats says a drafter is up again; shard and replica: until a request started
after the kill completes)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from common import Server, complete, descendants, stats, title
from traffic import PROMPTS, greedy, references

VICTIMS = {  # what to kill -> a piece of its process title (Ray names actor processes ray::Class)
    "drafter": "ray::DrafterActor",
    "target_shard": "ray::TargetShardActor",
    "replica": "ServeReplica:dflash:DFlashServer",
}


def find(roots: list[int], piece: str) -> int | None:
    pids = [p for root in roots for p in [root, *descendants(root)]]
    return next((p for p in pids if piece in title(p)), None)


async def drafter_back(client, killed: float, timeout_s: float) -> float | None:
    """Seconds from the kill until /stats shows the drafter down and then up again."""
    seen_down = False
    while time.monotonic() - killed < timeout_s:
        try:
            up = (await stats(client)).get("drafter_up")
        except Exception:
            up = None
        seen_down = seen_down or up is False
        if seen_down and up:
            return time.monotonic() - killed
        await asyncio.sleep(0.25)
    return None


async def one_kill(server: Server, roots: list[int], what: str, refs: dict, concurrency: int,
                   max_tokens: int, timeout_s: float) -> dict:
    pid = find(roots, VICTIMS[what])
    if pid is None:
        return {"skipped": f"no process titled {VICTIMS[what]!r} under pids {roots}"}
    outs, killed, stop = [], None, asyncio.Event()
    recovered: list[float] = []

    async def worker(i: int) -> None:
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            started = time.monotonic()
            out = await complete(client, greedy(prompt, max_tokens), stream=True)
            ok = out.status == 200 and out.error is None and out.done and out.text == refs[prompt]
            outs.append((started, ok, out))
            if ok and killed is not None and started > killed and not recovered:
                recovered.append(time.monotonic() - killed)
            if not ok:
                await asyncio.sleep(0.5)  # the server is down: do not spin

    async with server.client(timeout=600) as client:
        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(5)  # under load, every worker has a request in flight
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        if what == "drafter":
            back = await drafter_back(client, killed, timeout_s)
        else:
            while not recovered and time.monotonic() - killed < timeout_s:
                await asyncio.sleep(0.25)
            back = recovered[0] if recovered else None
        stop.set()
        await asyncio.gather(*tasks)
    during = [(s, ok, o) for s, ok, o in outs if s <= killed + (back or timeout_s)]
    lost = [o for s, ok, o in during if not ok]
    return {"pid": pid, "requests_during": len(during), "requests_lost": len(lost),
            "wrong_text": sum(o.status == 200 and o.error is None and o.done for o in lost),
            "http_5xx": sum(o.status >= 500 for _, _, o in outs),
            "recovered_s": None if back is None else round(back, 1),
            "lost_samples": sorted({f"{o.status} {o.error}" for o in lost})[:3]}


async def kills(server: Server, roots: list[int], concurrency: int = 8, max_tokens: int = 48,
                timeout_s: float = 180.0, progress=print) -> dict:
    async with server.client(timeout=600) as client:
        refs = await references(client, max_tokens)
    result = {"concurrency": concurrency}
    for what in VICTIMS:
        result[what] = await one_kill(server, roots, what, refs, concurrency, max_tokens,
                                      timeout_s)
        progress(f"  kill {what}: {result[what]}")
        await asyncio.sleep(2)
    return result
