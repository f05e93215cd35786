"""Speculative-decoding and serving statistics counted in the core (no Prometheus, no Ray).

`EngineStats` are the engine's running counters; `Engine.stats()` hands out a copy with the
current gauges (`EngineSnapshot`), and every step's own figures go to the engine's listeners as
a `StepStats`, so an exporter at the edge turns them into metrics without touching the core.
Names follow vLLM's: mean acceptance length = 1 + accepted / drafts (= the mean of the requests'
`acceptance_lengths`, see `outputs`); acceptance rate = accepted / draft tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .outputs import RequestOutput

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SpecDecodingStats:
    num_drafts: int = 0  # verify steps that carried drafts
    num_draft_tokens: int = 0  # proposed
    num_accepted_tokens: int = 0  # accepted drafts committed to the output
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
    num_spec_steps: int = 0  # steps where some decode's block verified drafts
    prompt_tokens: int = 0  # of requests added (the exporter counts at their first output)
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_drafter_losses: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    transfer_seconds: float = 0.0  # tensors between processes (Ray executor)
    transfer_bytes: int = 0
    max_batch_size: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> requests


@dataclass(slots=True)
class EngineSnapshot:
    """`Engine.stats()`: the counters so far plus the gauges of this moment."""

    counters: EngineStats
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    speculating: bool  # the policy's choice for the latest step
    drafter_up: bool
    policy: dict | None  # what spec_max_batch: auto measured, if in use

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total


def copy_stats(stats: EngineStats) -> EngineStats:
    spec = dataclasses.replace(stats.spec, accepted_per_pos=list(stats.spec.accepted_per_pos))
    return dataclasses.replace(stats, spec=spec, finished=dict(stats.finished))


@dataclass(slots=True)
class StepStats:
    """One engine step, as listeners see it (the gauges as of the step's end)."""

    time: float  # time.monotonic() at its end
    seconds: float
    num_prefills: int
    num_prefill_tokens: int
    num_decodes: int
    num_preempted: int
    speculative: bool  # the policy's choice for the step (`drafts` says what was verified)
    drafter_pass: bool
    drafter_lost: bool
    # per decode that verified drafts: (proposed, accepted drafts committed)
    drafts: list[tuple[int, int]]
    draft_seconds: float
    verify_seconds: float
    transfer_seconds: float
    transfer_bytes: int
    outputs: list[RequestOutput]  # this step's deltas (finished ones carry final metrics)
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    drafter_up: bool


class Listeners:
    """The engine's listeners: `on_step(StepStats)` after every step, `on_outputs(outputs)`
    with the final outputs of requests that end outside a step (aborted, failed). One that
    fails is logged once and never fails the step: metrics must not cost a request."""

    def __init__(self):
        self._pairs: list[tuple[Callable, Callable | None]] = []
        self._failed: set = set()

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def add(self, on_step: Callable, on_outputs: Callable | None = None) -> None:
        self._pairs.append((on_step, on_outputs))

    def remove(self, on_step: Callable) -> None:
        self._pairs = [p for p in self._pairs if p[0] is not on_step]

    def step(self, step: StepStats) -> None:
        for on_step, _ in self._pairs:
            self._call(on_step, step)

    def outputs(self, outputs: list[RequestOutput]) -> None:
        for _, on_outputs in self._pairs:
            if on_outputs is not None and outputs:
                self._call(on_outputs, outputs)

    def _call(self, listener: Callable, arg) -> None:
        try:
            listener(arg)
        except Exception:
            if listener not in self._failed:
                self._failed.add(listener)
                log.exception("engine listener %r failed (logged once)", listener)
