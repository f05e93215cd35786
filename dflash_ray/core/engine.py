"""The engine: requests in, token deltas out; one `step()` = schedule -> run -> postprocess.

Owns request bookkeeping and statistics; committing a step's tokens (detokenization, stop
conditions inside an accepted block) is `stopping`'s, model work the executor's (in-process
`LocalExecutor` or the Ray one), batching decisions the scheduler's.
`stream()` is the async face for servers: a background thread steps while requests are live.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator

from ..config import EngineConfig
from ..executors import make_executor
from .block_manager import BlockManager
from .outputs import RequestOutput, coalesce
from .sampling_params import InvalidRequest, SamplingParams
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput, prefill_len
from .sequence import Sequence
from .spec_policy import make_policy
from .stats import EngineStats
from .step_io import DecodeItem, PrefillItem, SamplingSpec, StepBatch, StepResult
from .stopping import commit_tokens
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# In a stretch of plain steps (speculation off) the target features of committed tokens wait for
# the drafter until the running sequences have this many rows waiting (from the feature width:
# about 9 MiB for the demo pair in fp32, 160 MiB for a Qwen3-8B drafter's 5 layers in bf16);
# then one context-only drafter pass takes them in. Concurrency 16 on the demo pair, speculation
# off: a pass every 8 steps ran at 0.99x plain, none at all at 1.00x.
MAX_WAITING_CONTEXT = 4096


class Engine:
    def __init__(self, config: EngineConfig, executor=None):
        self.config = config
        self.executor = executor or make_executor(config)
        info = self.executor.info()
        self.block_size = info["block_size"]
        self.eos_token_ids = set(info["eos_token_ids"])
        self.vocab_size = info["vocab_size"]
        self.max_model_len = config.max_model_len or info["max_position"]
        self.blocks = BlockManager(info["num_kv_blocks"], info["kv_block_len"])
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
        self.stats = EngineStats()
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rid_of: dict[int, str] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._loop_thread: threading.Thread | None = None
        self._sync_waiting: set[str] = set()  # ids a blocking `run_until_finished` waits for
        self._done: dict[str, RequestOutput] = {}
        self._errors: dict[str, Exception] = {}
        self._closed = False

    # ---- requests ----------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(
                    "prompt is text but the target directory has no tokenizer.json", "prompt"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequest("prompt token ids must be integers", "prompt")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"prompt token ids {bad[:5]} are outside the vocab (0..{self.vocab_size - 1})",
                    "prompt",
                )
        if not ids:
            raise InvalidRequest("prompt is empty", "prompt")
        return ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length max_model_len={self.max_model_len}",
                "prompt",
            )
        need = self.blocks.blocks_for(len(ids) + params.max_tokens + self.block_size)
        if need > self.blocks.num_blocks:
            raise InvalidRequest(
                f"prompt + max_tokens needs {need} KV blocks but the cache has "
                f"{self.blocks.num_blocks}; lower max_tokens or raise num_kv_blocks",
                "max_tokens",
            )
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine was shut down; it takes no new requests")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._seqs:
                raise InvalidRequest(f"request_id {rid!r} is already in use", "request_id")
            seq = Sequence(
                seq_id=next(self._seq_ids), prompt_ids=ids, params=params, arrival=time.monotonic()
            )
            self._seqs[rid] = seq
            self._rid_of[seq.seq_id] = rid
            self.scheduler.add(seq)
            self.stats.prompt_tokens += len(ids)
            self._wake.notify_all()
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it had already finished."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None or seq.finished:
                return False
            self.scheduler.finish(seq, "abort")
            self.executor.release([seq.seq_id])
            self._emit([self._output(request_id, seq, [], "")])
            self._forget(request_id)
            return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
        with self._lock:
            start = time.perf_counter()
            sched = self.scheduler.schedule()
            if sched.empty and not sched.preempted:
                return []
            batch = self._batch(sched)
            try:
                result = self.executor.execute(batch)
            except Exception as exc:
                # The executor's KV state for every live request is now unknown: fail them all
                # with the cause (streams get it raised, blocking callers too); the executor
                # recovers on its next call.
                self._fail_all(exc)
                raise
            outputs = self._postprocess(sched, result, batch.drafter_pass)
            if sched.decodes and not sched.prefills:  # what the speculation policy learns from
                # the kind the policy chose: a speculative regime includes the plain blocks of
                # sequences cooling down after a miss (spec_reject_cooldown)
                self.scheduler.policy.observe(
                    len(sched.decodes), sched.speculative, time.perf_counter() - start,
                    sum(len(r.tokens) for r in result.results),
                )
            return outputs

    def _batch(self, sched: SchedulerOutput) -> StepBatch:
        def spec(seq: Sequence) -> SamplingSpec:
            p = seq.params
            return SamplingSpec(p.temperature, p.top_p, p.top_k, p.seed)

        batch = StepBatch(dropped=[s.seq_id for s in sched.preempted])
        for seq in sched.prefills:
            n = prefill_len(seq)
            batch.prefills.append(
                PrefillItem(
                    seq.seq_id,
                    seq.token_ids[:n],
                    list(seq.block_table),
                    seq.needs_first_token,
                    spec(seq),
                )
            )
        for d in sched.decodes:
            s = d.seq
            batch.decodes.append(
                DecodeItem(
                    s.seq_id,
                    s.output_ids[-1],
                    s.num_cached,
                    s.num_drafted_ctx,
                    d.num_queries,
                    list(s.block_table),
                    spec(s),
                )
            )
        batch.drafter_pass = self._drafter_pass(sched)
        return batch

    def _drafter_pass(self, sched: SchedulerOutput) -> bool:
        """Whether the drafter runs this step: whenever a block drafts (q > 1), and in a stretch
        of plain steps (the policy decoding plain) only once MAX_WAITING_CONTEXT rows of context
        wait for it, to bound the memory they hold. A sequence's waiting rows are its cached
        positions the drafter cache lacks, prompt included."""
        if self.block_size == 1 or not sched.decodes:
            return False
        if sched.drafts:
            return True
        waiting = sum(d.seq.num_cached - d.seq.num_drafted_ctx for d in sched.decodes)
        return waiting >= MAX_WAITING_CONTEXT

    def _postprocess(
        self, sched: SchedulerOutput, result: StepResult, drafted: bool
    ) -> list[RequestOutput]:
        """`drafted`: the step had a drafter pass, which took in every decode's context."""
        st = self.stats
        st.num_steps += 1
        st.num_spec_steps += sched.drafts
        st.num_preemptions += len(sched.preempted)
        st.draft_seconds += result.draft_seconds
        st.verify_seconds += result.verify_seconds
        st.max_batch_size = max(st.max_batch_size, len(sched.prefills) + len(sched.decodes))
        by_id = {r.seq_id: r for r in result.results}
        now = time.monotonic()
        outputs = []
        for seq in sched.prefills:
            seq.num_cached = prefill_len(seq)
            seq.num_drafted_ctx = 0
            outputs.append(self._commit(seq, by_id[seq.seq_id].tokens, None, now))
        for d in sched.decodes:
            seq, r = d.seq, by_id[d.seq.seq_id]
            st.spec.observe(r.num_proposed, r.num_accepted)
            if r.num_proposed and not r.num_accepted:
                seq.draft_cooldown = self.config.spec_reject_cooldown
            seq.num_draft_tokens += r.num_proposed
            seq.num_accepted_tokens += r.num_accepted
            if drafted:
                seq.num_drafted_ctx = seq.num_cached
            seq.num_cached += len(r.tokens)  # = start + accepted + 1: rejected rows rolled back
            outputs.append(self._commit(seq, r.tokens, r, now))
            if not seq.finished:
                self.scheduler.trim(seq)
        outputs = [o for o in outputs if o is not None]
        self._emit(outputs)
        for o in outputs:
            if o.finished:
                self._forget(o.request_id)
                if o.request_id in self._sync_waiting:
                    self._done[o.request_id] = o
                    self._wake.notify_all()
        return outputs

    def _commit(self, seq: Sequence, tokens: list[int], r, now: float) -> RequestOutput | None:
        """Append committed tokens up to the first stop (see `stopping`); returns the request's
        delta."""
        p = seq.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        new_ids, new_text, reason = commit_tokens(seq, tokens, stop_ids, self.tokenizer)
        if seq.first_token_time is None and new_ids:
            seq.first_token_time = now
        if r is not None:
            seq.acceptance_lengths.append(len(new_ids))
        self.stats.generation_tokens += len(new_ids)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.executor.release([seq.seq_id])
        return self._output(self._rid_of[seq.seq_id], seq, new_ids, new_text)

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
        )

    def _forget(self, rid: str) -> None:
        seq = self._seqs.pop(rid, None)
        if seq is not None:
            self._rid_of.pop(seq.seq_id, None)

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
                        return [self._done[rid] for rid in request_ids]
                    if self._loop_thread is not None:
                        self._wake.wait(timeout=0.5)
                        continue
                    # under the same lock as the check: no stream loop can start in between
                    self._step()
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
        """Yield this request's deltas as steps produce them; closing the generator early (a
        client that went away) aborts the request and frees its blocks.

        Steps produced while the consumer was busy arrive merged into one delta, so a slow
        consumer (an HTTP stream on a busy host) costs one hop per wake-up, not one per step.
        After the first delta, deltas also wait for `stream_interval` tokens (config)."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:
            rid = self.add_request(prompt, params, request_id)
            self._queues[rid] = (loop, queue)
            self._ensure_loop()
        interval, sent, finished = self.config.stream_interval, 0, False
        try:
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
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            target = self._queues.get(o.request_id)
            if target is not None:
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, o)

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
                if self._closed or not self._queues or not self.scheduler.has_unfinished():
                    self._loop_thread = None
                    self._wake.notify_all()
                    return
            try:
                self._step()
            except Exception:  # _step() already failed every live request with the cause
                log.exception("engine step failed")

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            for rid, seq in list(self._seqs.items()):
                if not seq.finished:
                    self.scheduler.finish(seq, "error")
                    self._release_quietly(seq.seq_id)
                if rid in self._sync_waiting:
                    self._errors[rid] = exc
                    self._wake.notify_all()
                target = self._queues.get(rid)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, exc)
                self._forget(rid)

    def _release_quietly(self, seq_id: int) -> None:
        with contextlib.suppress(Exception):  # a broken executor forgets everything anyway
            self.executor.release([seq_id])

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
