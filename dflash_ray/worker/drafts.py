"""What crosses between the drafter and the target side of a step: the drafts of a drafter pass
(`Drafts`), and the target features of committed tokens waiting for the drafter's next pass
(`PendingFeatures`, owned by the target worker: one owner, in process or under Ray)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_DRAFT = -1  # a `Drafts.tokens` entry the target should not verify


def proposed_lengths(tokens: torch.Tensor, num_queries: list[int]) -> list[int]:
    """Drafts each row proposes for verification: the leading non-NO_DRAFT entries, <= q-1."""
    lead = (tokens != NO_DRAFT).to(torch.int32).cumprod(dim=1).sum(dim=1).tolist()
    return [min(n, q - 1) for n, q in zip(lead, num_queries, strict=True)]


@dataclass(slots=True)
class Drafts:
    """One drafter pass: a row per decode of the batch, in batch order."""

    # [N, B-1]: row i proposes its leading entries up to the first NO_DRAFT (at most q-1 of
    # them); the rest are not proposed (the drafter's confidence ran out, or q = 1, or the
    # drafter does not follow the sequence)
    tokens: torch.Tensor
    # per decode: the distribution [>= proposed, V] its drafts were sampled from; None: greedy
    # (or no draft). Only the lead target rank receives them (acceptance runs there).
    probs: list[torch.Tensor | None]
    num_proposed: list[int]  # per decode: drafts the target verifies (q = 1 + this)

    @classmethod
    def of(cls, tokens: torch.Tensor, probs: list[torch.Tensor | None],
           num_queries: list[int]) -> Drafts:
        return cls(tokens, probs, proposed_lengths(tokens, num_queries))


class PendingFeatures:
    """Target features [rows, K*H] of committed tokens a drafter has not taken in yet, per
    sequence. Steps without a drafter pass add rows; the next pass takes them all at once."""

    def __init__(self):
        self._parts: dict[int, list[torch.Tensor]] = {}

    def add(self, seq_id: int, rows: torch.Tensor) -> None:
        self._parts.setdefault(seq_id, []).append(rows)

    def take(self, seq_id: int, rows: int) -> torch.Tensor:
        """All of a sequence's waiting rows, which must be `rows` many."""
        parts = self._parts.pop(seq_id, [])
        got = sum(p.shape[0] for p in parts)
        if got != rows or not parts:
            raise RuntimeError(
                f"seq {seq_id}: {got} pending feature rows, the drafter needs {rows}"
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def drop(self, seq_ids) -> None:
        for sid in seq_ids:
            self._parts.pop(sid, None)

    def clear(self) -> None:
        self._parts.clear()
