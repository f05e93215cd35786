"""The exporter: an engine listener (`Engine.add_listener(exporter.on_step)`) that turns each
step's `StepStats` into the catalog's metrics, through a backend.

Counters add up to what the responses' `usage` reported: prompt tokens are counted at a
request's first output, generated tokens and the speculation counters per step, with the
engine's one definition of acceptance. Latency histograms come from the requests' own
timestamps (`RequestMetrics`): time to first token and queue time at the first output,
inter-token latency per later delta (its gap since the previous delta over its tokens), end to
end at the finish.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Protocol

from ..core.stats import StepStats
from .catalog import METRICS, Metric


class Handle(Protocol):
    def inc(self, value: float, labels: dict[str, str]) -> None: ...

    def set(self, value: float, labels: dict[str, str]) -> None: ...

    def observe(self, value: float, labels: dict[str, str]) -> None: ...


class Backend(Protocol):
    def make(self, metric: Metric) -> Handle: ...


class Exporter:
    def __init__(self, backend: Backend, model_name: str, replica: str = "0",
                 has_drafter: bool = True):
        self.m = {name: backend.make(metric) for name, metric in METRICS.items()}
        self.labels = {"model_name": model_name, "replica": replica}
        self.has_drafter = has_drafter
        self._last_token: dict[str, float] = {}  # request id -> its latest delta's time
        self._stop = threading.Event()

    def _with(self, **extra) -> dict[str, str]:
        return {**self.labels, **extra}

    def on_step(self, step: StepStats) -> None:
        m, labels = self.m, self.labels
        m["engine_steps"].inc(1, self._with(kind="spec" if step.speculative else "plain"))
        if step.drafts:
            per_pos: Counter = Counter()
            for _, accepted in step.drafts:
                per_pos.update(range(accepted))
            m["spec_decode_num_drafts"].inc(len(step.drafts), labels)
            m["spec_decode_num_draft_tokens"].inc(sum(p for p, _ in step.drafts), labels)
            m["spec_decode_num_accepted_tokens"].inc(sum(a for _, a in step.drafts), labels)
            for pos, n in per_pos.items():
                m["spec_decode_num_accepted_tokens_per_pos"].inc(n, self._with(position=str(pos)))
        if step.num_preempted:
            m["num_preemptions"].inc(step.num_preempted, labels)
        if step.drafter_lost:
            m["drafter_fallbacks"].inc(1, labels)
        if step.draft_seconds:
            m["draft_step_seconds"].observe(step.draft_seconds, labels)
        if step.verify_seconds:
            m["verify_step_seconds"].observe(step.verify_seconds, labels)
        if step.transfer_bytes:
            m["hidden_state_transfer_seconds"].observe(step.transfer_seconds, labels)
            m["hidden_state_transfer_bytes"].inc(step.transfer_bytes, labels)
        self._requests(step)
        self._gauges(step.num_running, step.num_waiting, step.kv_cache_usage, step.speculative,
                     step.drafter_up)

    def _gauges(self, running: int, waiting: int, kv_usage: float, speculating: bool,
                drafter_up: bool) -> None:
        m, labels = self.m, self.labels
        m["num_requests_running"].set(running, labels)
        m["num_requests_waiting"].set(waiting, labels)
        for cache in ("target", "drafter") if self.has_drafter else ("target",):
            m["kv_cache_usage_perc"].set(kv_usage, self._with(cache=cache))
        m["spec_decode_enabled"].set(float(speculating), labels)
        m["drafter_up"].set(float(drafter_up), labels)

    def watch(self, engine, interval_s: float = 1.0) -> None:
        """Refresh the gauges from `engine.stats()` every `interval_s` in a daemon thread, so
        they stay true (and exported: Ray's agent drops a gauge not set for two export
        intervals) while no step runs."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                s = engine.stats()
                self._gauges(s.num_running, s.num_waiting, s.kv_cache_usage, s.speculating,
                             s.drafter_up)

        threading.Thread(target=loop, name="dflash-metrics-gauges", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _requests(self, step: StepStats) -> None:
        m, labels = self.m, self.labels
        generated = 0
        for o in step.outputs:
            n, rm = len(o.new_token_ids), o.metrics
            generated += n
            if n and len(o.token_ids) == n:  # its first tokens
                m["prompt_tokens"].inc(len(o.prompt_token_ids), labels)
                m["time_to_first_token_seconds"].observe(rm.ttft_seconds, labels)
                m["request_queue_time_seconds"].observe(rm.queue_seconds, labels)
            elif n and o.request_id in self._last_token:
                gap = rm.last_token_time - self._last_token[o.request_id]
                m["inter_token_latency_seconds"].observe(gap / n, labels)
            if n:
                self._last_token[o.request_id] = rm.last_token_time
            if o.finished:
                self._last_token.pop(o.request_id, None)
                m["request_success"].inc(1, self._with(finished_reason=o.finish_reason))
                if rm.e2e_seconds is not None:
                    m["e2e_request_latency_seconds"].observe(rm.e2e_seconds, labels)
                if o.acceptance_lengths:
                    m["request_acceptance_length"].observe(o.acceptance_length, labels)
        if generated:
            m["generation_tokens"].inc(generated, labels)
