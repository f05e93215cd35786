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
                sink = await sinks.sink(address, hub.token)
                for i in range(n):
                    await sinks.push(sink, rid, i, {"i": i, "rid": rid, "finished": i == n - 1})
                await sinks.written(sink)
                return {"pushed": n}
            return PushedStream(hub, rid, call, lambda: None)

        streams = [request(f"r{k}", 5) for k in range(4)]
        got = await asyncio.gather(*(_collect(s) for s in streams))
        return got, sinks.counts, len(hub)

    got, counts, left_open = asyncio.run(main())
    assert got == [[{"i": i, "rid": f"r{k}", "finished": i == 4} for i in range(5)]
                   for k in range(4)]
    assert counts["items"] == 20 and 0 < counts["frames"] < 20  # pushed together: shared frames
    assert left_open == 0  # a stream read to its end leaves no queue behind (not closed)


def test_a_lost_item_is_an_error_not_clipped_text():
    async def main():
        hub, sinks = PushHub("127.0.0.1"), PushSinks()
        address = await hub.start()

        async def call():
            sink = await sinks.sink(address, hub.token)
            await sinks.push(sink, "g", 0, {"i": 0, "finished": False})
            await sinks.push(sink, "g", 2, {"i": 2, "finished": True})  # item 1 never sent
            await sinks.written(sink)
            return {"pushed": 3}

        items = []
        with pytest.raises(ConnectionError, match="item 2 came where 1 was due"):
            async for item in PushedStream(hub, "g", call, lambda: None):
                items.append(item)
        return items

    assert asyncio.run(main()) == [{"i": 0, "finished": False}]


def test_a_refusal_is_the_only_item_and_a_failed_call_raises_after_the_items_it_pushed():
    async def main():
        hub, sinks = PushHub("127.0.0.1"), PushSinks()
        address = await hub.start()

        async def refused():
            return {"error": {"status": 503, "message": "overloaded"}}

        async def dies():
            await sinks.push(await sinks.sink(address, hub.token), "b", 0, {"i": 0})
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
        writer.write(frame("not the token") + frame([["d", 0, {"i": 0}]]))
        await writer.drain()
        hung_up = await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        return cancelled.is_set(), hung_up, queue.qsize()

    was_cancelled, hung_up, leaked = asyncio.run(main())
    assert was_cancelled and hung_up and leaked == 0
