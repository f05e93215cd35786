"""The engine: requests in, token deltas out; one `step()` = schedule -> execute -> postprocess.

Owns request bookkeeping and statistics; committing a step's tokens (detokenization, stop
conditions inside an accepted block) is `stopping`'s, batching decisions the scheduler's, model
work the executor's: any object with the `Executor` methods (the in-process one in `worker/`,
the Ray one in `cluster/`; the entry points choose). The engine never calls the executor outside
a step: what it must tell the workers (released and preempted sequences) rides in the next
step's batch. How callers wait for outputs (blocking, or streamed while a background thread
steps) is `serving.Serving`'s, committing a step's results `postprocess.Postprocess`'s and the
pipelined step (`EngineConfig.overlap`) `overlap.Overlap`'s, all mixed in here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..config import EngineConfig
from .block_manager import BlockManager
from .outputs import RequestMetrics, RequestOutput
from .overlap import Flight, Overlap
from .postprocess import Postprocess, Taken
from .requests import check_fits, prompt_ids
from .sampling_params import InvalidRequest, SamplingParams
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput, step_batch
from .sequence import Sequence
from .serving import Serving
from .spec_policy import make_policy
from .stats import EngineSnapshot, EngineStats, Listeners, StepStats, copy_stats
from .step_io import Executor, SamplingSpec, StepBatch, StepResult, WorkersLost
from .streams import Streams
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Engine(Serving, Overlap, Postprocess):
    def __init__(self, config: EngineConfig, executor: Executor):
        self.config = config
        self.executor = executor
        info = executor.info()
        self.block_size = info.block_size
        self.eos_token_ids = set(info.eos_token_ids)
        self.vocab_size = info.vocab_size
        self.max_model_len = config.max_model_len or info.max_position
        self.blocks = BlockManager(info.num_kv_blocks, info.kv_block_len,
                                   min(info.num_slots, config.max_num_seqs))
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens or self.max_model_len,
                max_model_len=self.max_model_len,
                block_size=self.block_size,
            ),
            self.blocks,
            make_policy(config.spec_max_batch),
        )
        self.tokenizer = Tokenizer.maybe_load(config.target)
        self._stats = EngineStats()
        self._listeners = Listeners()
        self._speculating = False
        self._drafter_up = self.block_size > 1
        self._released: list[int] = []  # finished or aborted since the last step
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rid_of: dict[int, str] = {}
        self._lock = threading.RLock()  # bookkeeping: held for moments, never over a step
        self._step_lock = threading.RLock()  # one step at a time
        self._wake = threading.Condition(self._lock)
        self._streams = Streams()
        self._loop_thread: threading.Thread | None = None
        self._sync_waiting: set[str] = set()  # ids a blocking `run_until_finished` waits for
        self._done: dict[str, RequestOutput] = {}
        self._errors: dict[str, Exception] = {}
        self._closed = False
        # overlap: the thread the workers' steps run in, and the step in flight there
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="dflash-step")
                      if config.overlap else None)
        self._inflight: Flight | None = None

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        params.validate()
        ids = prompt_ids(prompt, self.tokenizer, self.vocab_size)
        check_fits(len(ids), params, self.max_model_len, self.blocks.num_blocks,
                   self.blocks.blocks_for(len(ids) + params.max_tokens + self.block_size))
        # unseeded requests get a seed of their own: every random draw of a request is then a
        # function of (seed, position), whatever else shares its steps (worker/sampler.py)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        sampling = SamplingSpec(params.temperature, params.top_p, params.top_k, seed,
                                coupled=self.config.sampling == "coupled")
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine was shut down; it takes no new requests")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._seqs:
                raise InvalidRequest(f"request_id {rid!r} is already in use", "request_id")
            seq = Sequence(next(self._seq_ids), ids, params, sampling,
                           RequestMetrics(arrival_time=time.monotonic()))
            self._seqs[rid] = seq
            self._rid_of[seq.seq_id] = rid
            self.scheduler.add(seq)
            self._stats.prompt_tokens += len(ids)
            self._wake.notify_all()
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it had already finished."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None or seq.finished:
                return False
            self._finish(seq, "abort", time.monotonic())
            out = self._output(request_id, seq, [], "")
            self._emit([out])
            self._listeners.outputs([out])
            self._forget(request_id)
            idle = self._loop_thread is None
        if idle:  # nobody steps soon: let the workers forget it now
            self._flush_released(wait=False)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def add_listener(self, on_step: Callable[[StepStats], None],
                     on_outputs: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """Call `on_step` with every step's `StepStats`, on the stepping thread, under the
        engine's lock: keep it cheap (an exporter updating counters). `on_outputs` gets the
        final outputs of requests that end outside a step (aborted, failed)."""
        with self._lock:
            self._listeners.add(on_step, on_outputs)

    def remove_listener(self, on_step: Callable[[StepStats], None]) -> None:
        with self._lock:
            self._listeners.remove(on_step)

    def stats(self) -> EngineSnapshot:
        """A consistent copy of the counters and the current gauges."""
        with self._lock:
            return EngineSnapshot(
                counters=copy_stats(self._stats),
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                kv_blocks_used=self.blocks.num_used,
                kv_blocks_total=self.blocks.num_blocks,
                speculating=self._speculating,
                drafter_up=self._drafter_up,
                policy=self.scheduler.policy.summary(),
            )

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step. A caller stepping the engine itself waits while the streaming loop
        runs (it stops once no stream is open): two threads stepping one engine would split a
        request's outputs between them. So do not step it by hand while streams are open."""
        with self._wake:
            while self._loop_thread not in (None, threading.current_thread()):
                self._wake.wait()
        return self._step()

    def _step(self) -> list[RequestOutput]:
        """Schedule and postprocess under the bookkeeping lock; the workers run outside it, so
        requests, aborts and stats reach the engine from any thread (an event loop) within a
        moment, never after a whole step. `_step_lock` keeps steps one at a time. With
        `overlap` the steps are pipelined (`Overlap`)."""
        with self._step_lock:
            if self._pool is not None:
                return self._overlapped_step()
            start = time.perf_counter()
            drafter_up = self._drafter_ready()
            with self._lock:
                planned = self._plan(drafter_up)
                released = self._take_released() if planned is None else None
            if planned is None:  # nothing to run: let the workers forget finished ones
                self._release(released)
                return []
            sched, batch = planned
            result = self._outcome(self.executor.execute, batch)
            if result is None:
                return []
            with self._lock:
                taken = self._advance(sched, batch, result)
                return self._finish_step(start, sched, batch, result, taken)

    def _outcome(self, call, *args) -> StepResult | None:
        """A step's result from `call`; None when the workers were lost (the running sequences
        are then recomputed); any other failure fails every live request and is raised."""
        try:
            return call(*args)
        except WorkersLost as exc:
            self._recompute_running(exc)
            return None
        except Exception as exc:
            self._fail_all(exc)
            raise

    def _drafter_ready(self) -> bool:
        return self.block_size > 1 and self._guarded(self.executor.drafter_ready)

    def _plan(self, drafter_up: bool) -> tuple[SchedulerOutput, StepBatch] | None:
        """The next step and its batch (carrying the sequences released since the last one),
        or None when there is nothing to run (the released ones then wait)."""
        self._drafter_up = drafter_up
        sched = self.scheduler.schedule(time.monotonic(), drafter_up)
        if sched.empty and not sched.preempted:
            return None
        return sched, step_batch(sched, self._take_released())

    def _recompute_running(self, exc: WorkersLost) -> None:
        """The workers lost this step and every running sequence's caches with it: each goes
        back to the head of the queue to be prefilled again from its committed tokens (the
        rebuilt workers know nothing of it), or fails with `exc` once it has been recomputed
        `step_retries` times."""
        with self._lock:
            self._released.clear()  # the workers that held them are gone
            now, failed = time.monotonic(), []
            requeued = self.scheduler.requeue_running()
            self._stats.num_preemptions += len(requeued)
            for seq in requeued:
                seq.num_recomputes += 1
                if seq.num_recomputes > self.config.step_retries:
                    rid = self._rid_of[seq.seq_id]
                    self._finish(seq, "error", now)
                    failed.append(self._output(rid, seq, [], ""))
                    self._fail_request(rid, exc)
            self._listeners.outputs(failed)
        log.warning("the workers were lost during a step (%s): %d running request(s) will be "
                    "recomputed, %d failed after %d recompute(s)", exc,
                    len(requeued) - len(failed), len(failed), self.config.step_retries)

    def _finish_step(self, start: float, sched: SchedulerOutput, batch: StepBatch,
                     result: StepResult, taken: list[Taken]) -> list[RequestOutput]:
        outputs, drafts = self._settle(taken)
        seconds = time.perf_counter() - start
        if sched.decodes and not sched.prefills:  # what the speculation policy learns from
            # the kind the policy chose: a speculative regime includes the plain blocks of
            # sequences cooling down after a miss (spec_reject_cooldown)
            self.scheduler.policy.observe(
                len(sched.decodes), sched.speculative, seconds,
                sum(len(r.tokens) for r in result.results),
            )
        if self._listeners:
            step = StepStats(
                time.monotonic(), seconds, len(batch.prefills),
                sum(len(p.token_ids) for p in batch.prefills), len(batch.decodes),
                len(batch.preempted), self._speculating, batch.drafter_pass,
                result.drafter_lost, drafts, result.draft_seconds, result.verify_seconds,
                result.transfer_seconds, result.transfer_bytes, outputs,
                len(self.scheduler.running), len(self.scheduler.waiting),
                self.blocks.num_used / self.blocks.num_blocks, self._drafter_up,
            )
            self._listeners.step(step)
        return outputs

    def _flush_released(self, wait: bool = True) -> None:
        """Tell the workers about finished requests now instead of with the next step (the
        engine is going idle): their per-sequence state (the target's pending features) goes.
        `wait=False`: only if no step is running (one that is will carry them)."""
        if not self._step_lock.acquire(blocking=wait):
            return
        try:
            if self._inflight is not None:
                if not wait:  # the step in flight is collected by whoever steps next
                    return
                self._drain()
            with self._lock:
                released = self._take_released()
            self._release(released)
        finally:
            self._step_lock.release()

    def _release(self, released: list[int]) -> None:
        if released:
            try:  # best effort: a failure has failed every live request already (`_guarded`)
                self._guarded(self.executor.execute, StepBatch(released=released))
            except Exception:
                log.warning("releasing finished requests failed", exc_info=True)

    def _guarded(self, call, *args):
        """An executor call. When it fails, the executor's state for every live request is
        unknown: they all fail with the cause (streams get it raised, blocking callers too);
        the executor recovers on its next call."""
        try:
            return call(*args)
        except Exception as exc:
            self._fail_all(exc)
            raise

    def _take_released(self) -> list[int]:
        released, self._released = self._released, []
        return released

    def _output(self, rid: str, seq: Sequence, new_ids: list[int], new_text: str) -> RequestOutput:
        return RequestOutput(
            request_id=rid,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=seq.text[: seq.text_sent],
            new_token_ids=new_ids,
            new_text=new_text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            acceptance_lengths=list(seq.acceptance_lengths),
            num_draft_tokens=seq.num_draft_tokens,
            num_accepted_tokens=seq.num_accepted_tokens,
            metrics=dataclasses.replace(seq.metrics),
        )

    def _forget(self, rid: str) -> None:
        seq = self._seqs.pop(rid, None)
        if seq is not None:
            self._rid_of.pop(seq.seq_id, None)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            now, failed = time.monotonic(), []
            for rid, seq in list(self._seqs.items()):
                if not seq.finished:
                    self._finish(seq, "error", now)
                    failed.append(self._output(rid, seq, [], ""))
                self._fail_request(rid, exc)
            self._listeners.outputs(failed)

    def _fail_request(self, rid: str, exc: Exception) -> None:
        """Hand `exc` to whoever waits on request `rid` (a blocked caller, its stream) and forget
        it (under the lock; the request is finished already)."""
        if rid in self._sync_waiting:
            self._errors[rid] = exc
            self._wake.notify_all()
        self._streams.post(rid, exc)
        self._forget(rid)

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        thread = self._loop_thread
        if thread is not None:
            thread.join(timeout=10)
        # open streams and blocked callers get an error instead of waiting forever
        if self._pool is not None:  # the step in flight, if any, ends before the workers do
            self._pool.shutdown(wait=True)
        self._fail_all(RuntimeError("the engine was shut down"))
        self.executor.shutdown()
