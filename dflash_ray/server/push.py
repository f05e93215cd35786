"""Pushed streams: the model server sends every step's deltas for all of an ingress's streams as
one message over one socket per (model replica, ingress replica), instead of one Serve stream
item per delta per request.

A token stream through Serve costs the model replica ~0.4 ms of CPU per delta outside the
engine (Serve's request machinery and gRPC under the event loop, docs/benchmarks.md), on the
cores the engine steps on; at concurrency 8 that is 8 items a step. Here a request is still one
Serve call (`ModelServer.generate_pushed`), so Serve's router still picks the replica, counts
the request as ongoing (autoscaling, `max_ongoing_requests`), cancels it when the client goes
away and fails it when the replica dies; only the deltas take the socket:

- the ingress replica listens on its node's address (`PushHub`, started on its first
  request) and names its address and a random token in every call;
- the model replica keeps one connection per ingress address (`PushSinks`), sends the token
  first, then frames of [[request id, index, item], ...]: the deltas that came out together
  are one frame (a flush is scheduled once per event-loop pass, after the streams the step woke
  have appended theirs);
- nothing is lost unseen: a request's items all go over the connection it started on (if that
  one breaks, the call fails instead of going on over a new one), and the ingress checks each
  item's index, so a gap is an error, never clipped text;
- the call returns the number of items it pushed once they are written (or the refusal itself,
  an {"error": ...} item, before any push), so the ingress's stream (`PushedStream`) ends only
  when all of them arrived: a socket and a Serve response are two channels with no order
  between them.

Frames are a 4-byte big-endian length and orjson, like the gRPC items they replace. Nothing here
imports ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import struct
from collections.abc import Awaitable, Callable

import orjson

log = logging.getLogger(__name__)
HEADER = struct.Struct("!I")
HIGH_WATER = 1 << 20  # bytes queued to one ingress before its producers wait for the socket
MAX_FRAME = 1 << 28  # a larger length is not ours: the connection is dropped
TOKEN_FRAME, TOKEN_S = 64, 5.0  # a peer's first frame (the token): at most this big, this soon
LATE_S = 30.0  # how long a stream waits for items its ended call says were pushed
CLOSE_S = 5.0  # how long closing a finished stream waits for its call's answer


def frame(obj) -> bytes:
    body = orjson.dumps(obj)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME):
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > limit:
        raise ConnectionError(f"a frame of {size} bytes (at most {limit})")
    return orjson.loads(await reader.readexactly(size))


class PushHub:
    """Ingress side: one listener for every model replica's pushes, a queue per live stream."""

    def __init__(self, host: str):
        self.host = host
        self.token = os.urandom(16).hex()
        self._queues: dict[str, asyncio.Queue] = {}
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Lock | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        if self._server is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self._server is None:
                    self._server = await asyncio.start_server(self._serve, self.host, 0)
                    self.address = self._server.sockets[0].getsockname()[:2]
        return self.address

    def open(self, request_id: str) -> asyncio.Queue:
        queue = self._queues[request_id] = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def __len__(self) -> int:
        """Streams open here."""
        return len(self._queues)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await asyncio.wait_for(read_frame(reader, TOKEN_FRAME), TOKEN_S)
            if not (isinstance(token, str) and hmac.compare_digest(token, self.token)):
                log.warning("pushed streams: refused a connection with the wrong token")
                return
            while True:
                for request_id, index, item in await read_frame(reader):
                    queue = self._queues.get(request_id)
                    if queue is not None:  # else the stream was closed (client gone)
                        queue.put_nowait((index, item))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError,
                TypeError):
            pass  # the model replica went away (its calls fail through Serve), or not ours
        finally:
            writer.close()


class PushedStream:
    """The ingress's view of one pushed request: an async iterator of its items, like a Serve
    stream. `start`: makes the Serve call and awaits its answer; `cancel`: cancels the call."""

    def __init__(self, hub: PushHub, request_id: str, start: Callable[[], Awaitable],
                 cancel: Callable[[], None]):
        self.hub, self.request_id = hub, request_id
        self._queue = hub.open(request_id)
        self._start, self._cancel = start, cancel
        self._call: asyncio.Future | None = None
        self._received = 0
        self._ended = False  # the last item (finished, or the refusal) is in, or it failed
        self._finished = False  # the finished item is in

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        try:
            return await self._next()
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        self._ended = True
        self.hub.close(self.request_id)  # a queue per request must not outlive it

    async def _next(self) -> dict:
        if self._ended and self._received < 0:
            raise StopAsyncIteration
        if self._call is None:
            self._call = asyncio.ensure_future(self._start())
        if self._queue.empty() and not self._call.done():
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({getter, self._call}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return self._item(*getter.result())
            getter.cancel()  # an item it took stays in the queue (asyncio.Queue's contract)
        if not self._queue.empty():
            return self._item(*self._queue.get_nowait())
        result = self._call.result()  # the call has ended; raises what it raised
        if "error" in result and self._received == 0:
            self._received = -1  # the answer was the refusal: nothing else comes
            self._end()
            return result
        if self._received >= result.get("pushed", 0):
            raise StopAsyncIteration
        try:  # pushed before the call returned, still on its way
            return self._item(*await asyncio.wait_for(self._queue.get(), LATE_S))
        except TimeoutError:
            raise ConnectionError(
                f"pushed stream {self.request_id}: {result['pushed'] - self._received} of its "
                f"{result['pushed']} items did not arrive within {LATE_S:g} s") from None

    def _item(self, index: int, item: dict) -> dict:
        if index != self._received:
            raise ConnectionError(f"pushed stream {self.request_id}: item {index} came where "
                                  f"{self._received} was due (items were lost)")
        self._received += 1
        if item.get("finished"):
            self._finished = True
            self._end()
        return item

    async def aclose(self) -> None:
        """Ends the stream; a call still running is cancelled (the client went away), except
        after the last item, when its answer is due any moment."""
        finished = self._finished
        self._end()
        call = self._call
        if call is None or call.done():
            return
        if finished:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(call), CLOSE_S)
            if call.done():
                return
        self._cancel()
        call.cancel()  # also before the Serve call was made (still in `start`)
        with contextlib.suppress(BaseException):
            await call


class _Sink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 counts: dict):
        self.writer, self.counts = writer, counts
        self.items: list = []
        self.broken = False
        # nothing comes back on this connection: EOF means the ingress end closed it
        self._watch = asyncio.ensure_future(self._until_closed(reader))

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            await reader.read()
        self.broken = True
        self.writer.close()

    @property
    def alive(self) -> bool:
        return not self.broken and not self.writer.is_closing()

    def flush(self) -> None:
        items, self.items = self.items, []
        if items and self.alive:  # else the requests' next push or `written` fails them
            self.writer.write(frame(items))
            self.counts["frames"] += 1
            self.counts["items"] += len(items)


class PushSinks:
    """Model-replica side: one connection per ingress address, frames of the items queued in
    one event-loop pass."""

    def __init__(self):
        self.counts = {"items": 0, "frames": 0}  # sent, over every connection
        self._sinks: dict[tuple[str, int], _Sink] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}

    async def sink(self, address: tuple[str, int], token: str) -> _Sink:
        """The live connection to `address`, opened if there is none."""
        address = tuple(address)
        sink = self._sinks.get(address)
        if sink is not None and sink.alive:
            return sink
        pending = self._connecting.get(address)
        if pending is None:
            pending = self._connecting[address] = asyncio.ensure_future(
                self._connect(address, token))
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._connecting.pop(address, None)

    async def _connect(self, address: tuple[str, int], token: str) -> _Sink:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(frame(token))
        sink = self._sinks[address] = _Sink(reader, writer, self.counts)
        return sink

    @staticmethod
    async def push(sink: _Sink, request_id: str, index: int, item: dict) -> None:
        """Queue a request's item `index` on its sink; a broken sink fails the request."""
        if not sink.alive:
            raise ConnectionError("the connection to the ingress broke mid-request")
        if not sink.items:
            asyncio.get_running_loop().call_soon(sink.flush)
        sink.items.append((request_id, index, item))
        if sink.writer.transport.get_write_buffer_size() > HIGH_WATER:
            await sink.writer.drain()

    @staticmethod
    async def written(sink: _Sink) -> None:
        """Once what was queued on `sink` is handed to the socket (the call may return)."""
        sink.flush()
        if not sink.alive:
            raise ConnectionError("the connection to the ingress broke mid-request")
        await sink.writer.drain()
