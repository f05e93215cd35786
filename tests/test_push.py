"""Pushed streams (server/push.py) without Ray: a real hub and real sinks on 127.0.0.1, the
Serve call played by a coroutine."""

from __future__ import annotations

import asyncio

import pytest

from dflash_ray.server.push import PushedStream, PushHub, PushSinks, frame


async def _collect(stream: PushedStream) -> list:
    return [item async for item in stream]


def test_items_pushed_before_the_call_returns_all_arrive_in_order_and_share_frames():
    async def main():
        hub, sinks = PushHub("127.0.0.1"), PushSinks()
        address = await hub.start()

        def request(rid: str, n: int):
            async def call():  # the model server's side: push n items, then return the count
                for i in range(n):
                    await sinks.push(address, hub.token, rid, {"i": i, "rid": rid})
                return {"pushed": n}
            return PushedStream(hub, rid, call, lambda: None)

        streams = [request(f"r{k}", 5) for k in range(4)]
        got = await asyncio.gather(*(_collect(s) for s in streams))
        return got, sinks.counts

    got, counts = asyncio.run(main())
    assert got == [[{"i": i, "rid": f"r{k}"} for i in range(5)] for k in range(4)]
    assert counts["items"] == 20 and 0 < counts["frames"] < 20  # pushed together: shared frames


def test_a_refusal_is_the_only_item_and_a_failed_call_raises_after_the_items_it_pushed():
    async def main():
        hub, sinks = PushHub("127.0.0.1"), PushSinks()
        address = await hub.start()

        async def refused():
            return {"error": {"status": 503, "message": "overloaded"}}

        async def dies():
            await sinks.push(address, hub.token, "b", {"i": 0})
            while not items:  # the stream has it before the call fails
                await asyncio.sleep(0.01)
            raise ConnectionError("replica died")

        first = await _collect(PushedStream(hub, "a", refused, lambda: None))
        items = []
        stream = PushedStream(hub, "b", dies, lambda: None)
        with pytest.raises(ConnectionError, match="replica died"):
            async for item in stream:
                items.append(item)
        return first, items

    first, items = asyncio.run(main())
    assert first == [{"error": {"status": 503, "message": "overloaded"}}]
    assert items == [{"i": 0}]


def test_closing_a_stream_cancels_its_call_and_a_wrong_token_pushes_nothing():
    async def main():
        hub = PushHub("127.0.0.1")
        address = await hub.start()
        cancelled = asyncio.Event()

        async def forever():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        calls = []
        stream = PushedStream(hub, "c", forever, lambda: calls[0].cancel())
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        calls.append(stream._call)
        waiting.cancel()
        await stream.aclose()
        # a peer without the token: the hub hangs up after the token, reading nothing more
        queue = hub.open("d")
        reader, writer = await asyncio.open_connection(*address)
        writer.write(frame("not the token") + frame([["d", {"i": 0}]]))
        await writer.drain()
        hung_up = await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        return cancelled.is_set(), hung_up, queue.qsize()

    was_cancelled, hung_up, leaked = asyncio.run(main())
    assert was_cancelled and hung_up and leaked == 0
