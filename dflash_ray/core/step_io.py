"""What one engine step sends to the runner(s) and gets back: ints and lists only, so the same
messages cross a Ray actor boundary unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingSpec:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass(slots=True)
class PrefillItem:
    seq_id: int
    token_ids: list[int]  # positions 0..len-1
    block_table: list[int]
    sample: bool  # False when recomputing a preempted sequence (its next token is known)
    sampling: SamplingSpec


@dataclass(slots=True)
class DecodeItem:
    seq_id: int
    bonus: int  # newest committed token, position `start`
    start: int  # target KV positions cached (== position of the bonus)
    drafted_ctx: int  # drafter KV positions cached
    num_queries: int  # block length q (1 for plain decoding)
    block_table: list[int]
    sampling: SamplingSpec


@dataclass(slots=True)
class StepBatch:
    prefills: list[PrefillItem] = field(default_factory=list)
    decodes: list[DecodeItem] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # preempted: forget their pending features
    # the drafter takes in every decode's waiting context this step and drafts the q > 1 blocks;
    # False: it sits out, the features of committed tokens wait for its next pass
    drafter_pass: bool = False


@dataclass(slots=True)
class SeqResult:
    seq_id: int
    tokens: list[int]  # committed this step (before stop / max_tokens truncation)
    num_proposed: int = 0
    num_accepted: int = 0


@dataclass(slots=True)
class StepResult:
    results: list[SeqResult]
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
