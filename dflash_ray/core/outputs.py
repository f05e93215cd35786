"""What the engine hands back per request and step: token and text deltas plus the speculation
statistics of the request so far."""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass, field


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
    acceptance_lengths: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_length(self) -> float:
        """Mean tokens committed per verify step (bonus included)."""
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else 0.0


def coalesce(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request: the newer state with both
    steps' deltas (for a consumer that fell behind the engine)."""
    out = copy(newer)
    out.new_token_ids = older.new_token_ids + newer.new_token_ids
    out.new_text = older.new_text + newer.new_text
    return out
