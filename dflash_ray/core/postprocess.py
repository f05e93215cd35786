"""Committing a step's results, mixed into `Engine`, in two halves: `_advance` on ints (what the
next schedule reads: lengths, the tokens up to max_tokens or a stop id, the sequences that end
and the blocks they give back), then `_settle` (text, stop strings, counts, outputs to their
streams). The plain step runs them back to back; the overlapped one (`overlap`) schedules and
launches the next step between them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .outputs import RequestOutput
from .scheduler import SchedulerOutput, prefill_len
from .sequence import Sequence
from .step_io import SeqResult, StepBatch, StepResult
from .stopping import settle_text, take_tokens


@dataclass(slots=True)
class Taken:
    """A sequence's share of a step after `Engine._advance`, waiting for `Engine._settle`."""

    seq: Sequence
    result: SeqResult
    new_ids: list[int]  # appended (up to max_tokens or a stop id); a stop string may cut them
    reason: str | None  # "stop" (a stop id), "length" or None so far


class Postprocess:
    def _advance(self, sched: SchedulerOutput, batch: StepBatch,
                 result: StepResult) -> list[Taken]:
        """The first half of postprocessing, on ints: everything the next schedule reads of
        this step's results (lengths, the tokens up to max_tokens or a stop id, which sequences
        ended, the blocks they give back). Returns what `_settle` finishes."""
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
        taken = []
        for seq in sched.prefills:
            if seq.finished:  # aborted while the step ran (or ended before it): result discarded
                continue
            seq.num_cached = prefill_len(seq)
            seq.num_drafted_ctx = 0
            taken.append(self._take(seq, by_id[seq.seq_id]))
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
            taken.append(self._take(seq, r))
            if not seq.finished:
                self.scheduler.trim(seq)
        return taken

    def _take(self, seq: Sequence, r: SeqResult) -> Taken:
        p = seq.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        new_ids, reason = take_tokens(seq, r.tokens, stop_ids)
        if reason is not None:
            self._stop(seq, reason)
        return Taken(seq, r, new_ids, reason)

    def _settle(self, taken: list[Taken]) -> tuple[list[RequestOutput], list[tuple[int, int]]]:
        """The second half: text, stop strings, counts, outputs to their streams. Returns the
        outputs and, per decode that verified drafts, (proposed, accepted drafts committed)."""
        now = time.monotonic()
        outputs, drafts = [], []
        for t in taken:
            outputs.append(self._commit(t, now, drafts))
        self._stats.num_spec_steps += bool(drafts)
        self._emit(outputs)
        for o in outputs:
            if o.finished:
                self._forget(o.request_id)
                if o.request_id in self._sync_waiting:
                    self._done[o.request_id] = o
                    self._wake.notify_all()
        return outputs, drafts

    def _commit(self, t: Taken, now: float, drafts: list[tuple[int, int]]) -> RequestOutput:
        """Detokenize the taken tokens, cut them at a stop string (see `stopping`) and count
        them; returns the request's delta."""
        seq, r = t.seq, t.result
        new_ids, new_text, reason = settle_text(seq, t.new_ids, t.reason, self.tokenizer)
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

    def _stop(self, seq: Sequence, reason: str) -> None:
        """End a sequence's scheduling now: its blocks and slot go back (nothing allocates
        them before the step in flight, if any, has returned) and the workers forget it with
        the next step."""
        self.scheduler.finish(seq, reason)
        self._released.append(seq.seq_id)

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        if not seq.finished:
            self._stop(seq, reason)
        seq.finish_reason = reason
        seq.metrics.finished_time = now
        self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1

