"""What the engine hands back per request and step: token and text deltas, the request's
speculation statistics so far, and its timestamps (for TTFT, inter-token, queue and end-to-end
latency, computed by whoever exports them).

Acceptance length has one definition everywhere (engine stats, usage, metrics): the tokens a
verify step that carried drafts committed to the output, bonus included; steps that verified no
draft (plain decoding, cooldown) are not verify steps with drafts and do not count.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    """time.monotonic() timestamps of one request, plus its step counts."""

    arrival_time: float
    scheduled_time: float | None = None  # first admitted to a step
    first_token_time: float | None = None
    last_token_time: float | None = None  # the step that produced this output's tokens
    finished_time: float | None = None
    num_steps: int = 0  # decode steps it took part in (its prefill not counted)
    num_preemptions: int = 0

    @property
    def queue_seconds(self) -> float | None:
        s = self.scheduled_time
        return None if s is None else s - self.arrival_time

    @property
    def ttft_seconds(self) -> float | None:
        f = self.first_token_time
        return None if f is None else f - self.arrival_time

    @property
    def e2e_seconds(self) -> float | None:
        f = self.finished_time
        return None if f is None else f - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated so far
    text: str
    new_token_ids: list[int]  # generated this step
    new_text: str
    finished: bool
    finish_reason: str | None
    # per verify step with drafts: tokens committed (bonus included); see the module docstring
    acceptance_lengths: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    metrics: RequestMetrics | None = None

    @property
    def acceptance_length(self) -> float:
        """Mean acceptance length: tokens committed per verify step with drafts (1 + accepted
        / verify steps with drafts); 0.0 when no step drafted."""
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else 0.0


def coalesce(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request: the newer state with both
    steps' deltas (for a consumer that fell behind the engine)."""
    out = copy(newer)
    out.new_token_ids = older.new_token_ids + newer.new_token_ids
    out.new_text = older.new_text + newer.new_text
    return out
