"""Continuous batching on ints: which sequences run this step, and how many KV blocks they hold.

Every step first gives each running sequence room for one verify block (preempting the newest
ones, by recompute, when blocks run out), then admits waiting sequences in arrival order while
blocks, state slots, sequence slots and the token budget last. Decodes and prefills share the
step's forward. Each decode's block length q is decided here, once per step. No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status
from .spec_policy import Adaptive, FixedLimit
from .step_io import DecodeItem, PrefillItem, StepBatch

# In a stretch of plain steps (speculation off) the target features of committed tokens wait for
# the drafter until the running decodes have this many rows waiting (about 9 MiB of rows for the
# demo pair in fp32, 160 MiB for a Qwen3-8B drafter's 5 layers in bf16, computed from the
# feature width; newly prefilled prompts wait on top, until their first decode step counts
# them); then one context-only drafter pass takes them in. Concurrency 16 on the demo pair,
# speculation off: a pass every 8 steps ran at 0.99x plain, none at all at 1.00x.
MAX_WAITING_CONTEXT = 4096


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int = 2048
    block_size: int = 1  # verify block B (1 = plain decoding)


@dataclass(slots=True)
class ScheduledDecode:
    seq: Sequence
    num_queries: int  # block length q <= B this step (1: plain; shorter near max_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[ScheduledDecode] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # the policy's choice for this step: the decodes may draft (blocks of q > 1, but q = 1 for
    # a sequence cooling down after a miss or not followed by the drafter); False: every block
    # is q = 1 (the drafter's context still follows)
    speculative: bool = True

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def drafts(self) -> bool:
        """Some decode's block verifies drafts (q > 1)."""
        return any(d.num_queries > 1 for d in self.decodes)


def prefill_len(seq: Sequence) -> int:
    """Tokens a prefill processes: the prompt for a new sequence, all but the newest token for a
    preempted one (the newest becomes the next block's bonus, as the invariant wants)."""
    return seq.num_tokens if seq.needs_first_token else seq.num_tokens - 1


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 policy: FixedLimit | Adaptive | None = None):
        """`policy` decides per step whether the running sequences speculate (spec_policy);
        default: always."""
        self.config = config
        self.blocks = blocks
        self.policy = policy or FixedLimit()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def block_len_for(self, seq: Sequence, speculative: bool) -> int:
        if not speculative or seq.draft_cooldown > 0 or not seq.drafter_follows:
            return 1
        # z-lab's verify size near max_tokens (its reference loop does the same, and the
        # acceptance lengths match it, tested): the last draft of the last block can be
        # verified although its token would be cut
        return min(self.config.block_size, seq.remaining + 1)

    def schedule(self, now: float, drafter_up: bool = True) -> SchedulerOutput:
        """`drafter_up`: a drafter is connected, so sequences admitted now may speculate."""
        out = SchedulerOutput()
        if self.running and self.config.block_size > 1:
            out.speculative = self.policy.speculate(len(self.running))
        # 1. Running sequences first: each needs room for its verify block.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            q = self.block_len_for(seq, out.speculative)
            while not self.blocks.can_grow(seq.block_table, seq.num_cached + q):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.blocks.grow(seq.block_table, seq.num_cached + q)
            out.decodes.append(ScheduledDecode(seq, q))
            if out.speculative and seq.draft_cooldown > 0:
                seq.draft_cooldown -= 1
            i += 1
        if out.preempted:
            return out
        # 2. Admit waiting sequences while room lasts.
        follows = drafter_up and self.config.block_size > 1
        budget = self.config.max_num_batched_tokens - sum(d.num_queries for d in out.decodes)
        while (self.waiting and len(self.running) < self.config.max_num_seqs
               and self.blocks.num_free_slots):
            seq = self.waiting[0]
            n = prefill_len(seq)
            if n > budget and (out.prefills or out.decodes):
                break
            seq.drafter_follows = follows
            lookahead = n + self.block_len_for(seq, out.speculative)
            if not self.blocks.can_grow(seq.block_table, lookahead):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, n)
            seq.slot = self.blocks.take_slot()
            seq.status = Status.RUNNING
            if seq.metrics.scheduled_time is None:
                seq.metrics.scheduled_time = now
            self.running.append(seq)
            out.prefills.append(seq)
            budget -= n
        return out

    def requeue_running(self) -> list[Sequence]:
        """Preempt every running sequence (its workers' state is gone); returns them, now at
        the head of the waiting queue in their running order."""
        requeued = list(self.running)
        for seq in reversed(requeued):
            self._preempt(seq)
        return requeued

    def _preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's KV and state; it recomputes from its tokens when readmitted
        first."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_cached = 0
        seq.num_drafted_ctx = 0
        seq.metrics.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        self.blocks.free_slot(seq.slot)
        seq.slot = None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def trim(self, seq: Sequence) -> None:
        """After acceptance, give back blocks past the cached positions."""
        self.blocks.shrink(seq.block_table, seq.num_cached)

    def lose_drafter(self) -> None:
        """The drafter's context for every live sequence is gone: they decode plain to the end
        (a preempted one is prefilled again and follows whatever drafter is then up)."""
        for seq in self.running:
            seq.drafter_follows = False


def step_batch(sched: SchedulerOutput, released: list[int]) -> StepBatch:
    """What the workers get for a scheduled step (copies of the block tables: the scheduler
    changes its own while the step runs elsewhere)."""
    batch = StepBatch(preempted=[s.seq_id for s in sched.preempted], released=released)
    for seq in sched.prefills:
        batch.prefills.append(PrefillItem(
            seq.seq_id, seq.token_ids[: prefill_len(seq)], list(seq.block_table),
            seq.needs_first_token, seq.sampling, seq.slot, seq.drafter_follows,
        ))
    for d in sched.decodes:
        s = d.seq
        batch.decodes.append(DecodeItem(
            s.seq_id, s.output_ids[-1], s.num_cached,
            s.num_drafted_ctx if s.drafter_follows else None, d.num_queries,
            list(s.block_table), s.sampling, s.slot,
        ))
    batch.drafter_pass = drafter_pass(batch)
    return batch


def drafter_pass(batch: StepBatch) -> bool:
    """Whether the drafter runs this step: whenever a followed block drafts (q > 1), and in a
    stretch of plain steps (the policy decoding plain) only once MAX_WAITING_CONTEXT rows of
    context wait for it, to bound the memory they hold. A sequence's waiting rows are its
    cached positions the drafter cache lacks, prompt included."""
    followed = [d for d in batch.decodes if d.drafted_ctx is not None]
    if not followed:
        return False
    if any(d.num_queries > 1 for d in followed):
        return True
    return sum(d.context_rows for d in followed) >= MAX_WAITING_CONTEXT
