"""A request's state as the scheduler sees it: token ids and lengths, no tensors.

Invariant between steps for a running sequence with n tokens (prompt + output):
the target cache holds positions 0..n-2 (`num_cached == n - 1`; the newest token, the bonus, is
not cached yet), and the drafter cache holds `num_drafted_ctx <= num_cached` positions; the rows
in between are target features the runner keeps until the next draft pass materializes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0  # target KV positions held
    num_drafted_ctx: int = 0  # drafter KV positions held
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    acceptance_lengths: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # proposed
    num_accepted_tokens: int = 0
    num_preemptions: int = 0
    # steps left decoding plain (q = 1) after a verify step rejected all its drafts
    draft_cooldown: int = 0
    first_token_time: float | None = None
    # detokenizer state (owned by the engine's postprocess)
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
