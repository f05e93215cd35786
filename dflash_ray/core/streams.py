"""Delivering a request's deltas from the stepping thread to the event loop that streams them.

The stepping thread posts each step's outputs (or the error that failed the request) into the
stream's asyncio queue with `call_soon_threadsafe`; the consumer side merges what piled up while
it was busy into one delta (`coalesce`), so a slow consumer costs one hop per wake-up, not one
per step, and after its first delta waits for `interval` tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .outputs import RequestOutput, coalesce


class Streams:
    def __init__(self):
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def __bool__(self) -> bool:
        return bool(self._queues)

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (loop, queue)
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def post(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)


async def deltas(queue: asyncio.Queue, interval: int) -> AsyncIterator[RequestOutput]:
    """The request's outputs until the finished one; raises what the engine posted instead."""
    sent, finished = 0, False
    while not finished:
        item = await queue.get()
        while not isinstance(item, BaseException) and not item.finished:
            if queue.qsize():
                newer = queue.get_nowait()
            elif sent and len(item.new_token_ids) < interval:
                newer = await queue.get()
            else:
                break
            item = newer if isinstance(newer, BaseException) else coalesce(item, newer)
        if isinstance(item, BaseException):
            raise item
        finished = item.finished
        sent += 1
        yield item
