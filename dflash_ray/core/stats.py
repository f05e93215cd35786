"""Speculative-decoding and serving statistics collected in the core (no Prometheus, no Ray).

The exporter at the edge turns these counters into `dflash:*` metrics named like vLLM's. Mean
acceptance length = 1 + accepted / drafts; acceptance rate = accepted / draft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecDecodingStats:
    num_drafts: int = 0  # verify steps that carried drafts
    num_draft_tokens: int = 0  # proposed
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        if num_proposed == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_proposed:
            self.accepted_per_pos += [0] * (num_proposed - len(self.accepted_per_pos))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(slots=True)
class EngineStats:
    spec: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    num_steps: int = 0
    num_spec_steps: int = 0  # steps where some decode's block could draft (q > 1)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    max_batch_size: int = 0
