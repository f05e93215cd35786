"""What every section of the reliability suite shares: the server under test (URL, key, model
name), one completion over HTTP (streamed or not) with its outcome, the server's /stats, and
the resident memory of processes by pid (read from /proc: the suite needs no psutil)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx


@dataclass(slots=True)
class Server:
    url: str
    api_key: str | None = None
    model: str = ""
    pids: list[int] = field(default_factory=list)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname, parts.port or 80

    def client(self, timeout: float = 120.0, connections: int = 512) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=64)
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout,
                                 limits=limits)


@dataclass(slots=True)
class Outcome:
    status: int
    text: str = ""
    seconds: float = 0.0
    error: str | None = None  # an error event in a stream, or the client's exception
    done: bool = False  # a stream ended with [DONE]


async def complete(client: httpx.AsyncClient, body: dict, route: str = "completions",
                   stream: bool = False, abandon_after: int | None = None) -> Outcome:
    """One request. `abandon_after`: close a stream after that many deltas (a client gone)."""
    body = dict(body, stream=stream)
    start = time.perf_counter()
    try:
        if not stream:
            r = await client.post(f"/v1/{route}", json=body)
            out = Outcome(r.status_code, seconds=time.perf_counter() - start)
            data = r.json()
            if r.status_code == 200:
                choice = data["choices"][0]
                out.text = choice.get("text") or (choice.get("message") or {}).get("content", "")
            else:
                out.error = (data.get("error") or {}).get("message", r.text[:200])
            return out
        async with client.stream("POST", f"/v1/{route}", json=body) as r:
            out, parts, deltas = Outcome(r.status_code), [], 0
            if r.status_code != 200:
                await r.aread()
                out.error = r.text[:200]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out.done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.error = event["error"].get("message", "error event")
                        continue
                    for choice in event.get("choices", []):
                        parts.append(choice.get("text") or
                                     (choice.get("delta") or {}).get("content") or "")
                    deltas += 1
                    if abandon_after is not None and deltas >= abandon_after:
                        break
            out.text, out.seconds = "".join(parts), time.perf_counter() - start
            return out
    except (httpx.HTTPError, ValueError) as exc:
        return Outcome(0, seconds=time.perf_counter() - start,
                       error=f"{type(exc).__name__}: {exc}"[:200])


async def stats(client: httpx.AsyncClient) -> dict:
    r = await client.get("/stats", timeout=30)
    r.raise_for_status()
    return r.json()


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 60.0) -> tuple[dict, float]:
    """Poll /stats until nothing runs or waits and no KV block is held; (stats, seconds)."""
    start = time.perf_counter()
    s = await stats(client)
    while time.perf_counter() - start < timeout_s:
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0:
            break
        await asyncio.sleep(0.2)
        s = await stats(client)
    return s, time.perf_counter() - start


def rss_mib(pids: list[int]) -> dict[int, float]:
    """Resident memory per live pid, MiB (Linux /proc)."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[pid] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return out


def descendants(root: int) -> list[int]:
    """Pids whose parent chain reaches `root` (the processes a `serve run` started)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], {root}
    while frontier:
        kids = {p for p, pp in parent.items() if pp in frontier}
        found += sorted(kids)
        frontier = kids
    return found


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    s = sorted(seconds)
    return {"n": len(s), "p50_s": round(statistics.median(s), 3),
            "p95_s": round(s[int(0.95 * (len(s) - 1))], 3), "max_s": round(s[-1], 3)}
