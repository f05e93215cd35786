"""The engine: requests in, token deltas out; one `step()` = schedule -> execute -> postprocess.

Owns request bookkeeping and statistics; committing a step's tokens (detokenization, stop
conditions inside an accepted block) is `stopping`'s, batching decisions the scheduler's, model
work the executor's: any object with the `Executor` methods (the in-process one in `worker/`,
the Ray one in `cluster/`; the entry points choose). The engine never calls the executor outside
a step: what it must tell the workers (released and preempted sequences) rides in the next
step's batch. How callers wait for outputs (blocking, or streamed while a background thread
steps) is `serving.Serving`'s, mixed in here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable

from ..config import EngineConfig
from .block_manager import BlockManager
from .outputs import RequestMetrics, RequestOutput
from .requests import check_fits, prompt_ids
from .sampling_params import InvalidRequest, SamplingParams
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput, prefill_len, step_batch
from .sequence import Sequence
from .serving import Serving
from .spec_policy import make_policy
from .stats import EngineSnapshot, EngineStats, Listeners, StepStats, copy_stats
from .step_io import Executor, SamplingSpec, SeqResult, StepBatch, StepResult, WorkersLost
from .stopping import commit_tokens
from .streams import Streams
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

class Engine(Serving):
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
        moment, never after a whole step. `_step_lock` keeps steps one at a time."""
        with self._step_lock:
            start = time.perf_counter()
            drafter_up = self.block_size > 1 and self._guarded(self.executor.drafter_ready)
            with self._lock:
                self._drafter_up = drafter_up
                sched = self.scheduler.schedule(time.monotonic(), drafter_up)
                if sched.empty and not sched.preempted:
                    released = self._take_released()
                else:
                    released, batch = None, step_batch(sched, self._take_released())
            if released is not None:  # nothing to run: let the workers forget finished ones
                self._release(released)
                return []
            try:
                result = self.executor.execute(batch)
            except WorkersLost as exc:
                self._recompute_running(exc)
                return []
            except Exception as exc:
                self._fail_all(exc)
                raise
            with self._lock:
                return self._finish_step(start, sched, batch, result)

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
                     result: StepResult) -> list[RequestOutput]:
        outputs, drafts = self._postprocess(sched, batch, result)
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

    def _postprocess(
        self, sched: SchedulerOutput, batch: StepBatch, result: StepResult
    ) -> tuple[list[RequestOutput], list[tuple[int, int]]]:
        """Commit the step's tokens; returns the outputs and, per decode that verified drafts,
        (proposed, accepted drafts committed)."""
        st = self._stats
        st.num_steps += 1
        st.num_preemptions += len(sched.preempted)
        st.draft_seconds += result.draft_seconds
        st.verify_seconds += result.verify_seconds
        st.transfer_seconds += result.transfer_seconds
        st.transfer_bytes += result.transfer_bytes
        st.max_batch_size = max(st.max_batch_size, len(sched.prefills) + len(sched.decodes))
        self._speculating = sched.speculative and self.block_size > 1  # the policy's choice
        took_context = batch.drafter_pass and not result.drafter_lost
        if result.drafter_lost:
            st.num_drafter_losses += 1
            self.scheduler.lose_drafter()
            self._drafter_up = False
        by_id = {r.seq_id: r for r in result.results}
        now = time.monotonic()
        outputs, drafts = [], []
        for seq in sched.prefills:
            if seq.finished:  # aborted while the step ran: its result goes nowhere
                continue
            seq.num_cached = prefill_len(seq)
            seq.num_drafted_ctx = 0
            outputs.append(self._commit(seq, by_id[seq.seq_id], now, drafts))
        for d in sched.decodes:
            seq, r = d.seq, by_id[d.seq.seq_id]
            if seq.finished:
                continue
            if r.num_proposed and not r.num_accepted:
                seq.draft_cooldown = self.config.spec_reject_cooldown
            if took_context and seq.drafter_follows:  # its waiting context went in
                seq.num_drafted_ctx = seq.num_cached
            seq.num_cached += len(r.tokens)  # = start + accepted + 1: rejected rows rolled back
            seq.metrics.num_steps += 1
            outputs.append(self._commit(seq, r, now, drafts))
            if not seq.finished:
                self.scheduler.trim(seq)
        st.num_spec_steps += bool(drafts)
        self._emit(outputs)
        for o in outputs:
            if o.finished:
                self._forget(o.request_id)
                if o.request_id in self._sync_waiting:
                    self._done[o.request_id] = o
                    self._wake.notify_all()
        return outputs, drafts

    def _commit(self, seq: Sequence, r: SeqResult, now: float,
                drafts: list[tuple[int, int]]) -> RequestOutput:
        """Append committed tokens up to the first stop (see `stopping`) and count them;
        returns the request's delta."""
        p = seq.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        new_ids, new_text, reason = commit_tokens(seq, r.tokens, stop_ids, self.tokenizer)
        m = seq.metrics
        if new_ids:
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
        if r.num_proposed:  # a verify step with drafts: its acceptance length (outputs.py)
            accepted = max(0, len(new_ids) - 1)
            seq.acceptance_lengths.append(len(new_ids))
            seq.num_draft_tokens += r.num_proposed
            seq.num_accepted_tokens += accepted
            self._stats.spec.observe(r.num_proposed, accepted)
            drafts.append((r.num_proposed, accepted))
        self._stats.generation_tokens += len(new_ids)
        if reason is not None:
            self._finish(seq, reason, now)
        return self._output(self._rid_of[seq.seq_id], seq, new_ids, new_text)

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        self.scheduler.finish(seq, reason)
        seq.metrics.finished_time = now
        self._released.append(seq.seq_id)
        self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1

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
        self._fail_all(RuntimeError("the engine was shut down"))
        self.executor.shutdown()
