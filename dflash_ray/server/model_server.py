"""The model-server deployment body: one `Engine` per replica, stepping in its own thread.

Every request is a streaming call (`generate`) yielding plain dicts (RequestOutput fields), so
many concurrent HTTP requests join the same engine steps. Closing the stream (client gone,
timeout) aborts the request and frees its KV blocks. A request that fails, before its first
output or mid-way, ends its stream with one {"error": ...} item with a short message; the
traceback goes to this server's log.

Text prompts are rendered and tokenized here, in a worker thread, and reach the engine as token
ids: the engine tokenizes in `add_request`, on the caller's thread (this event loop) under its
bookkeeping lock, so a long prompt held up every step and every stream while it was tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tokenizers import Tokenizer

from ..config import EngineConfig
from ..core.chat_template import ChatTemplate
from ..core.outputs import RequestOutput
from ..core.sampling_params import InvalidRequest, SamplingParams
from ..executors import make_engine
from ..metrics.exporter import Backend, Exporter
from .errors import APIError
from .push import PushSinks

log = logging.getLogger(__name__)


class ModelServer:
    def __init__(self, engine_config: dict, model_name: str, max_pending: int = 256,
                 metrics_backend: Backend | None = None, replica: str = "0",
                 deep_health_ttl_s: float = 5.0):
        """`metrics_backend`: where the engine's metrics go (Ray's metrics agent in a Serve
        replica); None exports none. `deep_health_ttl_s`: how long one deep health check's
        result answers every caller."""
        start = time.perf_counter()
        config = EngineConfig(**engine_config)
        self.engine = make_engine(config)
        if metrics_backend is not None:
            exporter = Exporter(metrics_backend, model_name, replica,
                                has_drafter=self.engine.block_size > 1)
            self.engine.add_listener(exporter.on_step, exporter.on_outputs)
            exporter.watch(self.engine)
        self.model_name = model_name
        self.max_pending = max_pending
        self._pending = 0
        tok = self.engine.tokenizer
        self.chat = ChatTemplate(tok.config.get("chat_template") if tok else None)
        # the engine's tokenizer file, used through `encode_batch`: the binding releases the GIL
        # there (not in `encode`), so the engine's stepping thread runs while a prompt encodes
        self._encoder = Tokenizer.from_file(str(Path(config.target) / "tokenizer.json")) \
            if tok else None
        self.deep_health_ttl_s = deep_health_ttl_s
        self._sinks = PushSinks()  # pushed streams' connections to the ingress replicas
        self._deep_check: asyncio.Task | None = None
        self._deep_checked = 0.0
        log.info("ready: model %r (target %s, drafter %s, block size %d, max_model_len %d) "
                 "loaded in %.1f s", model_name, config.target, config.drafter,
                 self.engine.block_size, self.engine.max_model_len, time.perf_counter() - start)

    def info(self) -> dict:
        return {
            "model": self.model_name,
            "max_model_len": self.engine.max_model_len,
            "block_size": self.engine.block_size,
        }

    def stats(self) -> dict:
        snap = self.engine.stats()
        s = snap.counters
        out = {
            "num_steps": s.num_steps,
            "max_batch_size": s.max_batch_size,
            "kv_blocks_used": snap.kv_blocks_used,
            "kv_blocks_total": snap.kv_blocks_total,
            "running": snap.num_running,
            "waiting": snap.num_waiting,
            "mean_acceptance_length": s.spec.mean_acceptance_length,
            "generation_tokens": s.generation_tokens,
            "spec_steps": s.num_spec_steps,
            "model_seconds": s.draft_seconds + s.verify_seconds,  # in the model's passes
            "drafter_up": snap.drafter_up,
            "pushed_items": self._sinks.counts["items"],  # pushed streams (server/push.py)
            "pushed_frames": self._sinks.counts["frames"],
        }
        if snap.policy is not None:  # spec_max_batch: auto, what it measured
            out["spec_policy"] = snap.policy
        return out

    async def generate(
        self, prompt: str | list[int] | None, messages: list[dict] | None,
        params: SamplingParams, request_id: str,
    ) -> AsyncIterator[dict]:
        """Stream RequestOutput dicts. A refused request yields one {"error": ...} item instead
        of raising, so the ingress sees the status code intact across the Serve boundary."""
        if self._pending >= self.max_pending:
            yield _error(APIError(503, f"server overloaded: {self._pending} requests in flight",
                                  kind="overloaded", headers={"Retry-After": "1"}))
            return
        # The slot is taken on admission, not at the first output: a burst that arrives while
        # the first request is still prefilling must not all get in.
        self._pending += 1
        stream = None
        try:
            try:
                if messages is not None or isinstance(prompt, str):
                    prompt = await asyncio.to_thread(self._prompt_ids, prompt, messages)
                stream = self.engine.stream(prompt, params, request_id)
                first = await anext(stream)  # add_request validates before the first step
            except InvalidRequest as exc:
                yield _error(APIError(400, str(exc), exc.field))
                return
            except APIError as exc:
                yield _error(exc)
                return
            except Exception as exc:
                yield _error(_failed(request_id, "could not start", exc))
                return
            yield _wire(first)
            try:
                async for out in stream:
                    yield _wire(out)
            except Exception as exc:
                yield _error(_failed(request_id, "failed mid-stream", exc))
        finally:
            self._pending -= 1
            if stream is not None:
                await stream.aclose()

    async def generate_pushed(
        self, prompt: str | list[int] | None, messages: list[dict] | None,
        params: SamplingParams, request_id: str, address: tuple[str, int], token: str,
    ) -> dict:
        """`generate`, its items pushed to the ingress listening at `address` (server/push.py):
        returns {"pushed": n} once all n are written to its socket, or the refusal itself (the first
        item, an {"error": ...}) without pushing. Cancelling the call aborts the request."""
        pushed, sink = 0, None
        async with contextlib.aclosing(self.generate(prompt, messages, params,
                                                     request_id)) as items:
            async for item in items:
                if pushed == 0 and "error" in item:
                    return item
                sink = sink or await self._sinks.sink(address, token)  # one for the request
                await self._sinks.push(sink, request_id, pushed, item)
                pushed += 1
        if sink is not None:
            await self._sinks.written(sink)
        return {"pushed": pushed}

    def _prompt_ids(self, prompt: str | None, messages: list[dict] | None) -> str | list[int]:
        """The prompt as token ids (in a worker thread); text where the engine should refuse
        it, in its own words (no tokenizer, a lone surrogate)."""
        text = self.chat.render(messages) if messages is not None else prompt
        if self._encoder is None:
            return text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text
        return self._encoder.encode_batch([text])[0].ids

    async def deep_health(self) -> dict:
        """Two tokens through the whole path: prefill, one drafter pass, one verify. One check
        at a time, and its result (or failure) answers every caller for `deep_health_ttl_s`:
        each check joins the batch other requests run in, so 300 probes raised their latency
        six-fold."""
        task = self._deep_check
        stale = time.monotonic() - self._deep_checked > self.deep_health_ttl_s
        if task is None or (task.done() and stale):
            task = self._deep_check = asyncio.ensure_future(self._deep_pass())
        return await asyncio.shield(task)  # a caller that gives up does not cancel the others'

    async def _deep_pass(self) -> dict:
        try:
            outs = [o async for o in self.engine.stream([0], SamplingParams(max_tokens=2,
                                                                              ignore_eos=True))]
        finally:
            self._deep_checked = time.monotonic()
        out = outs[-1] if outs else None
        if out is None or len(out.token_ids) != 2:
            raise RuntimeError(f"deep health check produced {out!r}")
        return {"status": "ok", "tokens": out.token_ids, "drafted": out.num_draft_tokens > 0}


def _wire(out: RequestOutput) -> dict:
    """What crosses to the ingress: the delta while streaming, the whole output at the end (the
    cumulative ids and acceptance lists would make every step's message grow with the output)."""
    if out.finished:
        return dataclasses.asdict(out)
    return {"new_text": out.new_text, "new_token_ids": out.new_token_ids, "finished": False,
            "finish_reason": None}


def _failed(request_id: str, what: str, exc: Exception) -> APIError:
    """Log the traceback here; the client gets the cause's first line, cut short."""
    log.error("request %s %s", request_id, what, exc_info=exc)
    cause = (str(exc).strip().splitlines() or [""])[0][:200]
    return APIError(500, f"generation {what}: {type(exc).__name__}"
                         f"{': ' + cause if cause else ''}", kind="server_error")


def _error(err: APIError) -> dict:
    return {"error": {"status": err.status, "message": err.message, "param": err.param,
                      "type": err.kind, "headers": err.headers}}
