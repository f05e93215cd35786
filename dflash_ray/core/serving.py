"""The engine's faces for callers, mixed into `Engine`: block until requests finish
(`run_until_finished`, what `LLM.generate` uses), or stream their deltas to an event loop
(`stream`) while a background thread steps the engine as long as a stream is open.

Both only ever hold the engine's bookkeeping lock for moments: the step itself runs outside it
(`Engine._step`), so an event loop adding or closing streams never waits for a step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from .outputs import RequestOutput
from .requests import prompt_ids
from .sampling_params import SamplingParams
from .streams import deltas

log = logging.getLogger(__name__)


class Serving:
    def run_until_finished(self, request_ids: list[str], on_finish=None) -> list[RequestOutput]:
        """Block until these requests finish and return their final outputs in order. Steps the
        engine itself, or waits while the background loop (started by `stream`) steps it."""
        with self._lock:
            self._sync_waiting.update(request_ids)
        try:
            seen: set[str] = set()
            while True:
                with self._wake:
                    for rid in request_ids:
                        if rid in self._errors:
                            raise self._errors[rid]
                        if rid in self._done and rid not in seen:
                            seen.add(rid)
                            if on_finish is not None:
                                on_finish(self._done[rid])
                    if len(seen) == len(request_ids):
                        break
                    if self._loop_thread is not None:
                        self._wake.wait(timeout=0.5)
                        continue
                # steps are one at a time (`_step_lock`) and deliver every output wherever it
                # goes, so a stream loop starting meanwhile only takes turns with this one
                self._step()
            if self._loop_thread is None:
                self._flush_released()
            return [self._done[rid] for rid in request_ids]
        finally:
            with self._lock:
                for rid in request_ids:
                    self._sync_waiting.discard(rid)
                    self._done.pop(rid, None)
                    self._errors.pop(rid, None)

    # ---- async streaming -------------------------------------------------------------------

    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's deltas as steps produce them (see `streams`: what piles up while
        the consumer is busy arrives merged, and after the first delta deltas wait for
        `stream_interval` tokens); closing the generator early (a client that went away) aborts
        the request and frees its blocks."""
        if isinstance(prompt, str):  # tokenized before the lock: a long prompt blocks no one
            prompt = prompt_ids(prompt, self.tokenizer, self.vocab_size)
        with self._lock:
            rid = self.add_request(prompt, params, request_id)
            queue = self._streams.open(rid, asyncio.get_running_loop())
            self._ensure_loop()
        finished = False
        try:
            async for item in deltas(queue, self.config.stream_interval):
                finished = item.finished
                yield item
        finally:
            self._streams.close(rid)
            if not finished:
                self.abort(rid)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            self._streams.post(o.request_id, o)

    def _ensure_loop(self) -> None:
        """Start the stepping thread if none runs (call with the lock held). The thread exits
        when no stream is open or no request is left; synchronous callers then step the engine
        again (`step` waits for it)."""
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(
                target=self._run_loop, name="dflash-engine", daemon=True
            )
            self._loop_thread.start()

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                # Only open streams keep it going: requests added for a synchronous caller are
                # that caller's to step (`run_until_finished` takes over when this returns).
                done = self._closed or not self._streams or not self.scheduler.has_unfinished()
                if done:
                    self._loop_thread = None
                    self._wake.notify_all()
            if done:
                if not self._closed:
                    self._flush_released()
                return
            try:
                self._step()
            except Exception:  # _step() already failed every live request with the cause
                log.exception("engine step failed")

