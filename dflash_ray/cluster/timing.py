"""What the Ray executor's steps and drafter restarts spent their seconds on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepTiming:
    """Seconds summed over steps. The drafter and the target run one after the other (the
    target waits for the drafts), so wall = draft + transfer + verify + ray_overhead. The
    transfer split needs the actors on one node (one monotonic clock; STRICT_PACK)."""

    steps: int = 0
    wall: float = 0.0  # execute() as the engine sees it
    draft: float = 0.0
    verify: float = 0.0
    transfer: float = 0.0  # features to the drafter + drafts back (the receiver already waits)

    @property
    def ray_overhead(self) -> float:
        """Dispatch (step messages or actor calls), argument pickling, waiting for results,
        skew between actors."""
        return self.wall - self.draft - self.verify - self.transfer


def restart_account(asked: float, timing: dict, seen: float, connected: float) -> dict:
    """Where a drafter restart's seconds went, from wall-clock times (one host's clock: the
    actor runs in the executor's placement group)."""
    return {
        "total_s": connected - asked,
        "process_and_imports_s": timing["imported"] - asked,
        "load_s": timing["loaded"] - timing["constructed"],
        "until_seen_s": seen - timing["loaded"],
        "connect_s": connected - seen,
    }
