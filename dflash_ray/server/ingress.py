"""The HTTP ingress: OpenAI-compatible routes, SSE streaming, errors in OpenAI's JSON shape.

Owns HTTP concerns only: parsing and rejecting requests (400 naming the field or the limit
passed, 413 and 408 for a body too large or too slow (body.py), 415, 401 on every route but
/health when an API key is set, 404), mapping failures to status codes (408 timeout, 503 +
Retry-After overload, 503 while the model server loads, 500 with a request id and the traceback
in the log), SSE framing (a failed stream ends with one error event, then [DONE]), and
cancelling the model-server stream when a client goes away. Generation is the model server's,
reached through a `Backend` (a Serve deployment handle in production).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.sampling_params import SamplingParams
from .body import BoundedBody, request_id
from .errors import APIError, body_parse_error, in_request_terms, validation_error
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    _SamplingFields,
    chunk_body,
    completion_body,
    new_id,
    usage,
)

log = logging.getLogger(__name__)
ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health"
LOADING_PROBE_S = 1.0  # how long /health waits for the model server before saying "loading"


class IngressSettings(BaseModel):
    model_name: str = "dflash-demo"
    request_timeout_s: float = Field(600.0, gt=0, description="server-side timeout -> 408")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger bodies -> 413, counted as "
                                "they arrive (chunked bodies too)")
    body_timeout_s: float = Field(10.0, gt=0, description="a body not read whole by then -> 408")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` on "
                                "every route but /health (DFLASH_API_KEY when unset)")
    limits: RequestLimits = Field(default_factory=RequestLimits)


class Backend(Protocol):
    def generate(self, prompt, messages, params: SamplingParams,
                 request_id: str) -> AsyncIterator[dict]:
        """A stream of RequestOutput dicts; the first item may be {"error": {...}}."""

    async def call(self, method: str) -> Any:
        """info / stats / deep_health on the model server."""


def _error_response(err: APIError, request_id: str) -> JSONResponse:
    return JSONResponse(err.body(request_id), status_code=err.status, headers=err.headers)


def _request_id(request: Request) -> str:
    return request_id(request.scope)


class Guard:
    """ASGI middleware, the outermost of ours: the API key on every route but the liveness
    probe, and a 500 with a request id for what no handler turned into an error response (a
    bug, logged).

    Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware relays every
    message of a response through a memory stream and a task of its own, which took a third of
    the ingress's CPU while it streamed SSE deltas (docs/benchmarks.md)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        # Everything but the liveness probe costs compute or shows state (/health/deep runs
        # the model, /stats and the docs describe the deployment): all of it needs the key.
        if self.api_key and path != "/health":
            auth = Headers(scope=scope).get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                await _error_response(APIError(401, "invalid or missing API key",
                                               kind="authentication_error"),
                                      rid)(scope, receive, send)
                return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:  # mid-response: the server logs it and drops the connection, so the
                raise  # client sees a broken stream, never one that looks complete
            log.exception("request %s (%s %s) failed", rid, scope["method"], path)
            await _error_response(APIError(500, f"internal server error; the server log has "
                                                f"the details under request id {rid}",
                                           kind="server_error"), rid)(scope, receive, send)


def make_api(backend_factory, settings: IngressSettings) -> FastAPI:
    """A FastAPI app whose routes call `backend_factory()` (resolved lazily: under Serve the
    handle exists only inside the replica)."""
    api = FastAPI(title="dflash-ray", version="0.1.0")
    api_key = settings.api_key or os.environ.get("DFLASH_API_KEY") or None
    model_ready = False  # once the model server has answered, /health stops asking it
    # the last added runs first: the key is checked before BoundedBody reads any body
    api.add_middleware(BoundedBody, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_s)
    api.add_middleware(Guard, api_key=api_key)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _error_response(err, _request_id(request))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        model = ChatCompletionRequest if request.url.path.endswith("/chat/completions") \
            else CompletionRequest
        return _error_response(validation_error(
            list(err.errors()), request.headers.get("content-type"), set(model.model_fields)),
            _request_id(request))

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        if err.status_code == 400:  # FastAPI could not parse the body; its cause says why
            api_err = body_parse_error(err.__cause__)
        elif err.status_code == 404:
            api_err = APIError(404, f"no route {request.method} {request.url.path}; this "
                                    f"server serves {ROUTES}", kind="not_found_error")
        elif err.status_code == 405:
            allow = (err.headers or {}).get("Allow", "?")
            api_err = APIError(405, f"{request.method} is not allowed on {request.url.path} "
                                    f"(allowed: {allow})", kind="method_not_allowed",
                               headers=err.headers)
        else:
            api_err = APIError(err.status_code, str(err.detail), headers=err.headers)
        return _error_response(api_err, _request_id(request))

    @api.get("/health")
    async def health():
        """503 "loading" until the model server has answered once. After that, replica
        liveness is Serve's to check: asking the model server on every probe would queue the
        probe behind generation and fail it under load."""
        nonlocal model_ready
        if not model_ready:
            try:
                await asyncio.wait_for(backend_factory().call("info"), LOADING_PROBE_S)
            except Exception as exc:
                loading = isinstance(exc, TimeoutError)
                return JSONResponse(
                    {"status": "loading" if loading else "unavailable",
                     "message": "the model server is loading" if loading else
                     f"the model server did not answer: {type(exc).__name__}"},
                    status_code=503, headers={"Retry-After": "5"})
            model_ready = True
        return {"status": "ok"}

    @api.get("/health/deep")
    async def deep_health() -> dict:
        try:
            return await asyncio.wait_for(backend_factory().call("deep_health"), 60)
        except Exception as exc:
            log.warning("deep health check failed", exc_info=exc)
            raise APIError(503, f"deep health check failed: {type(exc).__name__}",
                           kind="unhealthy") from exc

    @api.get("/stats")
    async def stats() -> dict:
        return await backend_factory().call("stats")

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "owned_by": "dflash-ray"}]}

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _serve(req, req.prompt_value(), None, False, _request_id(request))

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await _serve(req, None, messages, True, _request_id(request))

    async def _serve(req: _SamplingFields, prompt, messages, chat: bool, request_id: str):
        if req.model not in (None, settings.model_name):
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{settings.model_name!r}", "model", kind="not_found_error")
        req.check_supported(settings.limits)
        rid = new_id("chatcmpl" if chat else "cmpl")
        backend = backend_factory()
        streams = []
        try:
            for i in range(req.n):
                params = req.sampling_params(i)  # converted once, here at the edge
                streams.append(_Stream(backend.generate(prompt, messages, params, f"{rid}-{i}")))
            # Wait for every choice's first output: request errors surface here, before any
            # byte of a 200 response is sent.
            await asyncio.wait_for(asyncio.gather(*(s.start() for s in streams)),
                                   settings.request_timeout_s)
            if not req.stream:
                outs = await asyncio.wait_for(asyncio.gather(*(s.final() for s in streams)),
                                              settings.request_timeout_s)
                return completion_body(rid, settings.model_name, outs, chat)
        except BaseException as exc:
            await _close_all(streams)
            failure = _as_http_error(exc, req, settings.request_timeout_s)
            if failure is exc:
                raise
            raise failure from exc
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(streams, rid, request_id, settings, chat, include_usage),
            media_type="text/event-stream")

    return api


class _Stream:
    """One choice's stream from the model server, with its first item pre-fetched."""

    def __init__(self, agen: AsyncIterator[dict]):
        self._agen = agen
        self._first: dict | None = None
        self.last: dict | None = None

    async def start(self) -> None:
        self._first = _raise_error(await self._agen.__anext__())

    async def items(self) -> AsyncIterator[dict]:
        item = self._first
        while item is not None:
            self.last = item
            yield item
            if item["finished"]:
                return
            item = _raise_error(await self._agen.__anext__())

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


def _as_http_error(exc: BaseException, req: _SamplingFields, timeout_s: float) -> BaseException:
    """What a failure while serving a request tells the client; anything else is a bug."""
    if isinstance(exc, APIError):
        return in_request_terms(exc, req.engine_names())
    if isinstance(exc, TimeoutError):
        return APIError(408, f"request timed out after {timeout_s}s", kind="timeout")
    if isinstance(exc, BackPressureError):  # Serve's own queue (max_queued_requests) is full
        return APIError(503, "server overloaded: too many requests queued", kind="overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestCancelledError):
        return _cancelled()
    if isinstance(exc, RayActorError | ActorUnavailableError):
        return _replica_died()
    return exc


def _replica_died() -> APIError:
    return APIError(503, "the model replica serving this request died (Serve starts a new "
                         "one); retry it. A stream keeps the tokens it was sent",
                    kind="server_error", headers={"Retry-After": "1"})


def _cancelled() -> APIError:
    return APIError(499, "the request was cancelled (the client went away)", kind="cancelled")


def _raise_error(item: dict) -> dict:
    """The model server reports a refused or failed request as an {"error": ...} item."""
    if "error" in item:
        e = item["error"]
        raise APIError(e["status"], e["message"], e.get("param"),
                       e.get("type", "invalid_request_error"), e.get("headers"))
    return item


async def _close_all(streams: list[_Stream]) -> None:
    for s in streams:
        with contextlib.suppress(Exception):  # must not mask the original error
            await s.close()


_TIMED_OUT = object()  # put in an SSE stream's queue when its deadline passes


async def _sse(streams, rid, request_id: str, settings: IngressSettings, chat: bool,
               include_usage: bool):
    """Interleave the choices' deltas as SSE events; always end with [DONE]. The first failure
    (a choice's error, the deadline) ends the stream with one error event: no usage chunk then,
    the failed choices have none."""
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
        except APIError as err:
            await queue.put(err)
        except RequestCancelledError:  # the client went away: nobody to tell, nothing to log
            await queue.put(_cancelled())
        except (RayActorError, ActorUnavailableError):  # the model replica died or is gone
            log.warning("stream %s (request id %s): its model replica died", rid, request_id,
                        exc_info=True)
            await queue.put(_replica_died())
        except Exception:
            log.exception("stream %s (request id %s) failed", rid, request_id)
            await queue.put(APIError(500, f"the stream failed on the server; the server log "
                                          f"has the details under request id {request_id}",
                                     kind="server_error"))
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
                item = APIError(408, f"request timed out after {settings.request_timeout_s}s",
                                kind="timeout")
            if isinstance(item, APIError):
                yield _event(item.body(request_id))
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
        yield b"data: [DONE]\n\n"
    finally:
        timer.cancel()
        for t in tasks:
            t.cancel()
        await _close_all(streams)


def _event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"  # UTF-8, as SSE is; a tenth of json's cost
