"""The `hostile` section: issue 18's abuse cases, each sent while a victim (another user's small
greedy request, over and over) runs beside it. Per case: the statuses the abuse got, how many
were 5xx (target 0), and the victim's worst latency against its latency alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from common import Server, complete, summary

VICTIM = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}


async def raw(server: Server, head: bytes, body_parts, pause_s: float = 0.0,
              read_timeout_s: float = 60.0) -> int:
    """Send a request byte for byte (what httpx will not: chunked floods, slow bodies); its
    status, or 0 if the server closed the connection without one."""
    host, port = server.host_port
    reader, writer = await asyncio.open_connection(host, port)
    # read while writing: a server that refuses mid-body answers, then closes, and the write
    # after that fails with a reset; the answer it sent is what this case measures
    status_line = asyncio.ensure_future(asyncio.wait_for(reader.readline(), read_timeout_s))
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            for part in body_parts:
                if status_line.done():
                    break
                writer.write(part)
                await writer.drain()
                if pause_s:
                    await asyncio.sleep(pause_s)
        line = await status_line
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0
    finally:
        status_line.cancel()
        writer.close()


def post_head(server: Server, path: str, extra: str) -> bytes:
    auth = f"Authorization: Bearer {server.api_key}\r\n" if server.api_key else ""
    host, port = server.host_port
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"{auth}{extra}\r\n").encode()


async def chunked_oversized(server: Server, mib: int) -> list[int]:
    chunk = b"a" * 65536
    parts = [b'{"prompt": "'] + [chunk] * (mib * 16) + [b'"}']
    framed = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts] + [b"0\r\n\r\n"]
    head = post_head(server, "/v1/completions", "Transfer-Encoding: chunked\r\n")
    return [await raw(server, head, framed)]


async def slow_body(server: Server, seconds: float) -> list[int]:
    """Declares 4 KB, sends a byte a second: the server must answer (408) instead of holding."""
    head = post_head(server, "/v1/completions", "Content-Length: 4096\r\n")
    return [await raw(server, head, [b"{"] * int(seconds), pause_s=1.0)]


async def slowloris(server: Server, connections: int, seconds: float) -> list[int]:
    """Connections that trickle header lines and never finish them."""
    host, port = server.host_port

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())
            for i in range(int(seconds)):
                writer.write(f"X-Slow-{i}: a\r\n".encode())
                await writer.drain()
                await asyncio.sleep(1.0)
            return -1  # still held open: Serve's proxy (uvicorn) has no header timeout (README)
        except ConnectionError:
            return 0
        finally:
            writer.close()

    return list(await asyncio.gather(*(one() for _ in range(connections))))


async def posts(server: Server, bodies: list[bytes], route: str = "completions") -> list[int]:
    async with server.client(timeout=120) as client:
        rs = await asyncio.gather(*(client.post(f"/v1/{route}", content=b,
                                                headers={"Content-Type": "application/json"})
                                    for b in bodies))
    return [r.status_code for r in rs]


async def gets(server: Server, path: str, n: int, with_key: bool) -> list[int]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                 headers=server.headers if with_key else {}) as client:
        rs = await asyncio.gather(*(client.get(path) for _ in range(n)),
                                  return_exceptions=True)
    return [r.status_code if isinstance(r, httpx.Response) else 0 for r in rs]


def cases(server: Server, quick: bool) -> dict:
    """name -> a coroutine factory returning the abuse's statuses."""
    stops = [f"s{i}" for i in range(80_000)]
    return {
        "chunked_oversized_body": lambda: chunked_oversized(server, 2 if quick else 24),
        "slow_incomplete_body": lambda: slow_body(server, 4 if quick else 30),
        "slowloris_headers": lambda: slowloris(server, 8 if quick else 64, 4 if quick else 30),
        "stop_strings_80k": lambda: posts(server, [json.dumps(
            {"prompt": "a", "max_tokens": 256, "stop": stops}).encode()] * 2),
        "lone_surrogate": lambda: posts(server, [b'{"prompt": "\\ud800", "max_tokens": 4}']),
        "lone_surrogate_chat": lambda: posts(server, [
            b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 4}'],
            "chat/completions"),
        "deep_json": lambda: posts(server, [b"[" * 100_000 + b"]" * 100_000]),
        "bad_utf8": lambda: posts(server, [b'{"prompt": "\xff\xfe\xfd", "max_tokens": 4}']),
        "boolean_token_ids": lambda: posts(server, [b'{"prompt": [true, false]}']),
        "unknown_path": lambda: gets(server, "/v1/nope", 1, with_key=True),
        "deep_health_flood" + ("_unauthenticated" if server.api_key else ""):
            lambda: gets(server, "/health/deep", 50 if quick else 300, with_key=False),
    }


async def victim_during(server: Server, abuse) -> tuple[list[int], list[float]]:
    """Run `abuse()` while the victim sends one request after another; the abuse's statuses
    and the victim's latencies (at least one victim request, started with the abuse)."""
    latencies, done = [], asyncio.Event()

    async def victim() -> None:
        async with server.client(timeout=600) as client:
            while True:
                out = await complete(client, VICTIM)
                latencies.append(out.seconds if out.status == 200 else float("inf"))
                if done.is_set():
                    return

    task = asyncio.create_task(victim())
    try:
        statuses = await abuse()
    finally:
        done.set()
        await task
    return statuses, latencies


async def hostile(server: Server, quick: bool = False, progress=print) -> dict:
    async with server.client(timeout=600) as client:
        alone = [(await complete(client, VICTIM)).seconds for _ in range(3)]
    result = {"victim_alone": summary(alone), "cases": {}}
    for name, abuse in cases(server, quick).items():
        start = time.perf_counter()
        statuses, latencies = await victim_during(server, abuse)
        counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
        result["cases"][name] = {
            "statuses": counts, "http_5xx": sum(s >= 500 for s in statuses),
            "victim_worst_s": round(max(latencies), 3), "victim_requests": len(latencies),
            "seconds": round(time.perf_counter() - start, 1)}
        progress(f"  {name}: {counts}, victim worst {max(latencies):.2f} s")
    result["http_5xx"] = sum(c["http_5xx"] for c in result["cases"].values())
    return result
