"""Reading a request body at a bounded cost: at most `max_body_bytes` bytes, within
`body_timeout_s` seconds, whatever the client declares.

Owns the ASGI middleware that reads the whole body before any route runs, counting bytes as they
arrive (a chunked body has no Content-Length to check up front), and answers 413 the moment the
count passes the cap, 408 when the body has not arrived in time: a 24 MB chunked body was read
and tokenized whole, and a client that stops sending mid-body held its request open with no
deadline. The route then reads the buffered body as usual.

It does not own the request line and headers: the app sees a request only once the HTTP server
(Serve's proxy, uvicorn) has parsed them, and uvicorn has no timeout for them (README, "Limits").
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .protocol import new_id


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


def request_id(scope: Scope) -> str:
    """Serve's proxy puts its request id in `x-request-id` (the id its log lines carry);
    elsewhere one is made here. Kept in the scope's state, where `Request.state` finds it."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = Headers(scope=scope).get("x-request-id") or new_id("req")
    return state["request_id"]


class BoundedBody:
    """ASGI middleware: buffer the request body (at most `max_bytes`, within `timeout_s`), then
    run the app with the buffered body; refuse it with an OpenAI-shaped 413 or 408 otherwise."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else {}
        if "content-length" not in headers and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body (a GET, the lifespan): nothing to read
            return
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_bytes:
            await self._refuse(self._too_large(f"of {size} bytes"), scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooLarge:
            await self._refuse(self._too_large("sent so far"), scope, receive, send)
            return
        except TimeoutError:
            await self._refuse(APIError(408, f"the request body did not arrive within "
                                             f"{self.timeout_s}s", kind="timeout"),
                               scope, receive, send)
            return
        except _ClientGone:
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # after the body: the client's disconnect, as the server reports it
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, what: str) -> APIError:
        return APIError(413, f"the request body {what} exceeds the limit of {self.max_bytes} "
                             f"bytes", kind="too_large")

    async def _refuse(self, err: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close, so the server drops the rest of a body nobody will read
        headers = {**err.headers, "Connection": "close"}
        response = JSONResponse(err.body(request_id(scope)), status_code=err.status,
                                headers=headers)
        await response(scope, receive, send)
