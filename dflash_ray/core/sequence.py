"""A request's state as the scheduler sees it: token ids and lengths, no tensors.

Invariant between steps for a running sequence with n tokens (prompt + output):
the target cache holds positions 0..n-2 (`num_cached == n - 1`; the newest token, the bonus, is
not cached yet), and the drafter cache holds `num_drafted_ctx <= num_cached` positions; the rows
in between are target features the target worker keeps until the drafter's next pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .outputs import RequestMetrics
from .sampling_params import SamplingParams
from .step_io import SamplingSpec


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampling: SamplingSpec  # what the workers see of `params`, built once
    metrics: RequestMetrics
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0  # target KV positions held
    num_drafted_ctx: int = 0  # drafter KV positions held
    # the drafter has this sequence's context (set at admission while a drafter is up; cleared
    # for good when the drafter is lost): only then may its blocks draft
    drafter_follows: bool = False
    block_table: list[int] = field(default_factory=list)
    slot: int | None = None  # per-sequence state slot while running (recurrent caches)
    finish_reason: str | None = None
    # per verify step that carried drafts: tokens it committed (bonus included)
    acceptance_lengths: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # proposed
    num_accepted_tokens: int = 0  # accepted drafts that were committed
    # steps left decoding plain (q = 1) after a verify step rejected all its drafts
    draft_cooldown: int = 0
    # times it was recomputed after the workers were lost mid-step (EngineConfig.step_retries)
    num_recomputes: int = 0
    # detokenizer state (owned by `stopping`)
    text: str = ""
    text_sent: int = 0  # characters of text handed out (the rest may still hold a stop string)
    read_offset: int = 0
    prefix_offset: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    @property
    def needs_first_token(self) -> bool:
        return not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
