"""What a request or a deployment may cost or expose, checked without a server: the body
reader stops at the cap however the body arrives, and the shard group's rendezvous store
listens only where the ranks connect. (Over HTTP: test_server.py.)"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from dflash_ray.server.body import BoundedBody

CHUNKED = [(b"transfer-encoding", b"chunked")]


def run_bounded(chunks, max_bytes: int, timeout_s: float = 5.0) -> tuple[int, dict, int, bool]:
    """BoundedBody over a client sending `chunks` (an iterator: it may never end): (status,
    JSON body, bytes it pulled from the client, whether the app ran)."""
    pulled = 0
    ran = False
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        nonlocal ran
        ran = True
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"got": len(body)})
                    .encode()})

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": CHUNKED}
    asyncio.run(BoundedBody(app, max_bytes, timeout_s)(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:])), pulled, ran


def endless(size: int):
    while True:
        yield b"x" * size


def test_a_chunked_body_is_refused_once_past_the_cap_never_read_further():
    status, body, pulled, ran = run_bounded(endless(1000), max_bytes=4096)
    assert status == 413 and body["error"]["type"] == "too_large" and not ran, body
    assert pulled == 5000  # the chunk that passed the cap, and not one more


def test_a_body_within_the_cap_reaches_the_app_whole():
    status, body, _, ran = run_bounded(iter([b"a" * 3000, b"b" * 1096]), max_bytes=4096)
    assert (status, body, ran) == (200, {"got": 4096}, True)


def test_a_body_that_never_ends_is_408_at_its_deadline():
    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": CHUNKED}
    asyncio.run(BoundedBody(app, 4096, 0.3)(scope, trickle, send))
    assert sent[0]["status"] == 408


def listening_addresses(port: int) -> list[str]:
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)

    psutil = pytest.importorskip("psutil")

    return [c.laddr.ip for c in psutil.Process(os.getpid()).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def test_the_rendezvous_store_listens_only_on_the_ranks_address():
    """Target rank 0 serves the shard group's TCPStore on the node IP Ray gives it; TCPStore's
    own server listened on every interface (`::`)."""
    from dflash_ray.parallel.communicator import connect_store, open_store

    host = "127.0.0.1"  # what Ray gives the actor on a one-node local cluster
    store, port = open_store(host, timeout_s=10)
    assert listening_addresses(port) == [host]
    client = connect_store(host, port, timeout_s=10)
    client.set("k", "v")
    assert store.get("k") == b"v"
    del client, store
    assert listening_addresses(port) == []  # the store closed the socket it was given
