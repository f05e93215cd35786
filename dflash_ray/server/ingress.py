"""The HTTP ingress: OpenAI-compatible routes, SSE streaming, errors in OpenAI's JSON shape.

Owns HTTP concerns only: parsing and rejecting requests (400 naming the field, 413, 401),
mapping failures to status codes (408 timeout, 503 + Retry-After overload), SSE framing, and
cancelling the model-server stream when a client goes away. Generation is the model server's,
reached through a `Backend` (a Serve deployment handle in production).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray.serve.exceptions import BackPressureError

from ..core.sampling_params import SamplingParams
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
    chunk_body,
    completion_body,
    new_id,
    usage,
)


class IngressSettings(BaseModel):
    model_name: str = "dflash-demo"
    request_timeout_s: float = Field(600.0, gt=0, description="server-side timeout -> 408")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger bodies -> 413")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>`")


class Backend(Protocol):
    def generate(self, prompt, messages, params: SamplingParams,
                 request_id: str) -> AsyncIterator[dict]:
        """A stream of RequestOutput dicts; the first item may be {"error": {...}}."""

    async def call(self, method: str) -> Any:
        """info / stats / deep_health on the model server."""


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def make_api(backend_factory, settings: IngressSettings) -> FastAPI:
    """A FastAPI app whose routes call `backend_factory()` (resolved lazily: under Serve the
    handle exists only inside the replica)."""
    api = FastAPI(title="dflash-ray", version="0.1.0")
    api_key = settings.api_key or os.environ.get("DFLASH_API_KEY") or None

    @api.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_body_bytes:
            return _error_response(APIError(413, f"request body of {size} bytes exceeds "
                                                 f"{settings.max_body_bytes}", kind="too_large"))
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if api_key and path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error_response(APIError(401, "invalid or missing API key",
                                                kind="authentication_error"))
        return await call_next(request)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _error_response(err)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(APIError(400, "malformed JSON body", None))
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg', 'invalid value')}" if field else first.get(
            "msg", "invalid request")
        return _error_response(APIError(400, message, field))

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @api.get("/health/deep")
    async def deep_health() -> dict:
        try:
            return await asyncio.wait_for(backend_factory().call("deep_health"), 60)
        except Exception as exc:
            raise APIError(503, f"deep health check failed: {exc}", kind="unhealthy") from exc

    @api.get("/stats")
    async def stats() -> dict:
        return await backend_factory().call("stats")

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "owned_by": "dflash-ray"}]}

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await _serve(req, req.prompt_value(), None, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await _serve(req, None, messages, chat=True)

    async def _serve(req: _SamplingFields, prompt, messages, chat: bool):
        if req.model not in (None, settings.model_name):
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{settings.model_name!r}", "model", kind="not_found_error")
        req.check_supported()
        rid = new_id("chatcmpl" if chat else "cmpl")
        backend = backend_factory()
        streams = []
        for i in range(req.n):
            params = req.sampling_params(i)  # converted once, here at the edge
            streams.append(_Stream(backend.generate(prompt, messages, params, f"{rid}-{i}")))
        try:
            # Wait for every choice's first output: request errors surface here, before any
            # byte of a 200 response is sent.
            await asyncio.wait_for(asyncio.gather(*(s.start() for s in streams)),
                                   settings.request_timeout_s)
            if not req.stream:
                outs = await asyncio.wait_for(asyncio.gather(*(s.final() for s in streams)),
                                              settings.request_timeout_s)
                return completion_body(rid, settings.model_name, outs, chat)
        except TimeoutError as exc:
            await _close_all(streams)
            raise APIError(408, f"request timed out after {settings.request_timeout_s}s",
                           kind="timeout") from exc
        except BackPressureError as exc:  # Serve's own queue (max_queued_requests) is full
            await _close_all(streams)
            raise APIError(503, f"server overloaded: {exc}", kind="overloaded",
                           headers={"Retry-After": "1"}) from exc
        except BaseException:
            await _close_all(streams)
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(streams, rid, settings, chat, include_usage), media_type="text/event-stream")

    return api


class _Stream:
    """One choice's stream from the model server, with its first item pre-fetched."""

    def __init__(self, agen: AsyncIterator[dict]):
        self._agen = agen
        self._first: dict | None = None
        self.last: dict | None = None

    async def start(self) -> None:
        self._first = await self._agen.__anext__()
        if "error" in self._first:
            e = self._first["error"]
            raise APIError(e["status"], e["message"], e.get("param"), e.get("type",
                           "invalid_request_error"), e.get("headers"))

    async def items(self) -> AsyncIterator[dict]:
        item = self._first
        while item is not None:
            self.last = item
            yield item
            if item["finished"]:
                return
            item = await self._agen.__anext__()

    async def final(self) -> dict:
        async for _ in self.items():
            pass
        return self.last

    async def close(self) -> None:
        close = getattr(self._agen, "aclose", None) or getattr(self._agen, "cancel", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result


async def _close_all(streams: list[_Stream]) -> None:
    for s in streams:
        with contextlib.suppress(Exception):  # must not mask the original error
            await s.close()


_TIMED_OUT = object()  # put in an SSE stream's queue when its deadline passes


async def _sse(streams, rid, settings: IngressSettings, chat: bool, include_usage: bool):
    """Interleave the choices' deltas as SSE events; always end with [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: _Stream) -> None:
        try:
            first = True
            async for out in stream.items():
                if out["new_text"] or out["finished"] or first:
                    finish = out["finish_reason"] if out["finished"] else None
                    await queue.put(chunk_body(rid, settings.model_name, index, out["new_text"],
                                               finish, chat, first))
                    first = False
        except Exception as exc:
            await queue.put({"error": {"message": str(exc), "type": "server_error",
                                       "code": 500}})
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    # one timer for the whole stream (a wait_for per event would make a task per event)
    timer = asyncio.get_running_loop().call_later(settings.request_timeout_s, queue.put_nowait,
                                                  _TIMED_OUT)
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is _TIMED_OUT:
                yield _event({"error": {"message": "request timed out", "type": "timeout",
                                        "code": 408}})
                break
            if item is None:
                done += 1
                continue
            yield _event(item)
        else:
            if include_usage:
                outs = [s.last for s in streams]
                body = chunk_body(rid, settings.model_name, 0, "", None, chat, False)
                body["choices"] = []
                body["usage"] = usage(len(outs[0]["prompt_token_ids"]), outs)
                yield _event(body)
        yield "data: [DONE]\n\n"
    finally:
        timer.cancel()
        for t in tasks:
            t.cancel()
        await _close_all(streams)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
