"""What one engine step sends to the workers and gets back: ints and lists only, so the same
messages cross a Ray actor boundary unchanged.

The scheduler decides each decode's block length q once (`DecodeItem.num_queries`: 1 for a plain
step); the drafter then proposes up to q - 1 drafts, and the target verifies the bonus plus the
drafts proposed. Nothing downstream rewrites q.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class WorkersLost(RuntimeError):
    """The executor lost its workers' state during a step (executor=ray: a target shard died or
    the step passed its deadline). Nothing of the step was committed and the executor rebuilds
    its workers on its next call, so the engine can recompute the running sequences from their
    committed tokens, as after a preemption (`EngineConfig.step_retries`)."""


@dataclass(slots=True, frozen=True)
class SamplingSpec:
    """What the workers need of a request's SamplingParams, built once at admission. `seed` is
    always set (the engine draws one for unseeded requests), so every random draw is a function
    of (seed, position): a step's draws do not depend on the requests it shares or on
    preemption. `coupled` (EngineConfig.sampling): every token is drawn with noise fixed by
    (seed, position) and drafts are accepted by equality with the target's own draw, so the
    text does not depend on drafting either; else rejection sampling (see `worker/sampler.py`)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    coupled: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_draft_probs(self) -> bool:
        """Its drafts are accepted by rejection sampling, which reads the drafter's q."""
        return not self.greedy and not self.coupled


@dataclass(slots=True)
class PrefillItem:
    seq_id: int
    token_ids: list[int]  # positions 0..len-1
    block_table: list[int]
    sample: bool  # False when recomputing a preempted sequence (its next token is known)
    sampling: SamplingSpec
    slot: int  # the sequence's state slot (caches with per-sequence state)
    drafter_follows: bool  # keep its target features for the drafter (see DecodeItem)


@dataclass(slots=True)
class DecodeItem:
    seq_id: int
    bonus: int  # newest committed token, position `start`
    start: int  # target KV positions cached (== position of the bonus)
    # drafter KV positions cached; None when the drafter does not follow this sequence (it was
    # admitted while no drafter was up, or the drafter was lost since): then q is always 1
    drafted_ctx: int | None
    num_queries: int  # block length q <= B (1 for plain decoding)
    block_table: list[int]
    sampling: SamplingSpec
    slot: int

    @property
    def context_rows(self) -> int:
        """Target features of committed tokens waiting for the drafter's next pass."""
        return self.start - (self.drafted_ctx or 0)


@dataclass(slots=True)
class StepBatch:
    prefills: list[PrefillItem] = field(default_factory=list)
    decodes: list[DecodeItem] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # forget their cached state
    released: list[int] = field(default_factory=list)  # finished or aborted: forget everything
    # the drafter takes in every followed decode's waiting context this step and drafts their
    # q > 1 blocks; False: it sits out, the features of committed tokens wait for its next pass
    drafter_pass: bool = False

    def drafter_decodes(self) -> list[int]:
        """Indices of the decodes the drafter takes part in this step (both sides of a step
        derive them from the batch, so no list of them travels)."""
        if not self.drafter_pass:
            return []
        return [i for i, d in enumerate(self.decodes) if d.drafted_ctx is not None]


@dataclass(slots=True, frozen=True)
class ExecutorInfo:
    """What the engine learns from its executor once: the checkpoints' facts and the cache
    capacity the workers allocated."""

    block_size: int  # verify block B (1 = plain decoding)
    eos_token_ids: list[int]
    vocab_size: int
    max_position: int
    num_kv_blocks: int
    kv_block_len: int
    num_slots: int  # sequences whose per-sequence state fits (the sequence limit if none)
    kv_bytes_per_token: int  # every worker's caches together
    state_bytes_per_seq: int


@dataclass(slots=True)
class SeqResult:
    seq_id: int
    tokens: list[int]  # committed this step (before stop / max_tokens truncation)
    num_proposed: int = 0  # drafts the target verified
    num_accepted: int = 0  # of them, accepted


@dataclass(slots=True)
class Span:
    """One worker method or tensor transfer of a step, timed where it ran (time.monotonic: one
    clock per node). `worker` is "target", "drafter" or "channel"."""

    worker: str
    method: str
    start: float
    end: float
    nbytes: int = 0  # tensor bytes moved (transfers)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class StepResult:
    results: list[SeqResult]  # prefills first, then decodes, in batch order
    spans: list[Span] = field(default_factory=list)
    # the drafter failed during this step (its context for every sequence is gone): the step
    # was verified without drafts, and every live sequence continues with plain decoding
    drafter_lost: bool = False

    def seconds(self, worker: str, method: str) -> float:
        return sum(s.seconds for s in self.spans if s.worker == worker and s.method == method)

    @property
    def draft_seconds(self) -> float:
        return self.seconds("drafter", "draft")

    @property
    def verify_seconds(self) -> float:
        return self.seconds("target", "verify")

    @property
    def transfer_bytes(self) -> int:
        """Bytes that crossed (each message counted at its send; its receive has the same)."""
        return sum(s.nbytes for s in self.spans
                   if s.worker == "channel" and s.method.startswith("send_"))

    @property
    def transfer_seconds(self) -> float:
        """Time tensors spent crossing between processes: each receive counts from the later
        of its own start and the matching send's start (the rest is waiting for the peer to
        compute), to its end."""
        sends = {s.method.removeprefix("send_"): s for s in self.spans
                 if s.worker == "channel" and s.method.startswith("send_")}
        total = 0.0
        for s in self.spans:
            if s.worker == "channel" and s.method.startswith("recv_"):
                send = sends.get(s.method.removeprefix("recv_"))
                begin = max(s.start, send.start) if send is not None else s.start
                total += max(0.0, s.end - begin)
        return total


class Executor(Protocol):
    """Runs the workers for the engine: `LocalExecutor` (worker/) or `RayExecutor` (cluster/)."""

    def info(self) -> ExecutorInfo: ...

    def drafter_ready(self) -> bool:
        """Whether a drafter is connected, so that sequences admitted now may speculate."""

    def execute(self, batch: StepBatch) -> StepResult: ...

    def shutdown(self) -> None: ...
