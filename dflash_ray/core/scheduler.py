"""Continuous batching on ints: which sequences run this step, and how many KV blocks they hold.

Every step first gives each running sequence room for one verify block (preempting the newest
ones, by recompute, when blocks run out), then admits waiting sequences in arrival order while
blocks, sequence slots and the token budget last. Decodes and prefills share the step's forward.
No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status
from .spec_policy import Adaptive, FixedLimit


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int = 2048
    block_size: int = 1  # verify block B (1 = plain decoding)


@dataclass(slots=True)
class ScheduledDecode:
    seq: Sequence
    num_queries: int  # block length q <= B this step (shorter near max_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[ScheduledDecode] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # the policy's choice for this step: the decodes may draft (blocks of q > 1, but q = 1 for
    # a sequence cooling down after a miss); False: every block is q = 1 (the drafter's context
    # still follows)
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
        if not speculative or seq.draft_cooldown > 0:
            return 1
        return min(self.config.block_size, seq.remaining + 1)

    def schedule(self) -> SchedulerOutput:
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
        budget = self.config.max_num_batched_tokens - sum(d.num_queries for d in out.decodes)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = prefill_len(seq)
            if n > budget and (out.prefills or out.decodes):
                break
            lookahead = n + self.block_len_for(seq, out.speculative)
            if not self.blocks.can_grow(seq.block_table, lookahead):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.prefills.append(seq)
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's KV; it recomputes from its tokens when readmitted first."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_cached = 0
        seq.num_drafted_ctx = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def trim(self, seq: Sequence) -> None:
        """After rollback, give back blocks past the cached positions."""
        self.blocks.shrink(seq.block_table, seq.num_cached)
