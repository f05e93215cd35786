"""When to speculate: whether a step's decodes verify drafted blocks or decode plain (q = 1).

Drafting pays where a verify block costs little more than a one-token step (a GPU at small
batch) and loses where the target is compute-bound (large batches; any batch on a small CPU).
Both kinds are lossless: greedy output is the target's and sampling keeps its distribution
whichever runs. (They draw different random numbers, so under `Adaptive`, whose choices follow
timing, a seeded sampled request is reproducible in distribution only.)

- `FixedLimit`: speculate while at most `spec_max_batch` sequences run (None: always).
- `Adaptive` (`spec_max_batch: auto`) learns the limit from the engine's own decode steps. A
  kind's cost is seconds per committed token: a step's time per sequence, kept per batch-size
  bucket (1, 2-3, 4-7, 8-15, ...) over the recent steps of that kind, divided by the tokens a
  sequence commits per step (1 when plain; tau when speculating, from the recent speculative
  steps of all buckets: acceptance depends on the drafter and the text, not on the batch, and
  it varies from 1 to B from step to step, so it needs many samples). Each bucket runs the
  cheaper kind and now and then the other for `probe_steps`, so a change (drafts accepted less
  often on new prompts, a busier machine) is noticed: `probe_every` steps after a switch, twice
  as long after each probe that changed nothing, up to `max_probe_every` (probes cost little
  where the choice is stable). A new bucket speculates first (every bucket does until tau
  rests on `min_tau_samples` sequence-steps), then decodes plain for a probe.

No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class FixedLimit:
    limit: int | None = None

    def speculate(self, num_running: int) -> bool:
        return self.limit is None or num_running <= self.limit

    def observe(self, num_decodes: int, speculated: bool, seconds: float, tokens: int) -> None:
        pass

    def summary(self) -> None:
        """Nothing is measured."""
        return None


class _Window:
    """The last `size` (amount, count) pairs and their running sums: read every step, so no
    walk over the pairs (and /stats reads two numbers while the engine thread adds)."""

    def __init__(self, size: int):
        self.pairs: deque[tuple[float, int]] = deque(maxlen=size)
        self.amount, self.count = 0.0, 0

    def add(self, amount: float, count: int) -> None:
        if len(self.pairs) == self.pairs.maxlen:
            old_amount, old_count = self.pairs[0]
            self.amount -= old_amount
            self.count -= old_count
        self.pairs.append((amount, count))
        self.amount += amount
        self.count += count

    def ratio(self) -> float | None:
        """Amount per count; None while empty."""
        return self.amount / self.count if self.count else None


class _Bucket:
    def __init__(self, window: int):
        # recent steps per kind (True: speculative) as (seconds, sequences in the step)
        self.steps = {True: _Window(window), False: _Window(window)}
        self.probing = False  # the kind being tried, while probe_left > 0
        self.probe_left = 0
        self.since_probe = 0
        self.probe_every = 0  # steps between probes, set by the policy
        self.best: bool | None = None  # the kind chosen last


class Adaptive:
    def __init__(self, probe_every: int = 48, probe_steps: int = 4, window: int = 16,
                 tau_window: int = 256, max_probe_every: int = 768, min_tau_samples: int = 64):
        if probe_steps < 2:
            raise ValueError(f"probe_steps must be >= 2 (the first step of a switch is not "
                             f"measured), got {probe_steps}")
        if min_tau_samples > tau_window:
            raise ValueError(f"min_tau_samples={min_tau_samples} can never be reached with "
                             f"tau_window={tau_window} steps")
        self.probe_every, self.probe_steps, self.window = probe_every, probe_steps, window
        self.max_probe_every = max(probe_every, max_probe_every)
        self.min_tau_samples = min_tau_samples
        self.buckets: dict[int, _Bucket] = {}
        # recent speculative steps as (tokens committed, sequences in the step)
        self._spec_tokens = _Window(tau_window)
        self._last_kind: bool | None = None  # the engine's previous decode step

    @staticmethod
    def bucket_of(num_running: int) -> int:
        return max(1, num_running).bit_length()

    @property
    def tau(self) -> float | None:
        """Tokens a sequence commits per speculative step, recently."""
        return self._spec_tokens.ratio()

    def cost(self, bucket: int, kind: bool) -> float | None:
        """Seconds per committed token of a kind of step in a bucket; None until measured."""
        b = self.buckets.get(bucket)
        per_seq = b.steps[kind].ratio() if b is not None else None
        if per_seq is None or not kind:
            return per_seq
        tau = self.tau
        return per_seq / tau if tau else None

    def speculate(self, num_running: int) -> bool:
        k = self.bucket_of(num_running)
        b = self.buckets.setdefault(k, _Bucket(self.window))
        if b.probe_left > 0:
            b.probe_left -= 1
            return b.probing
        spec, plain = self.cost(k, True), self.cost(k, False)
        if spec is None or self._spec_tokens.count < self.min_tau_samples:
            # too little seen of speculation to judge it (tau from a few steps at the start of
            # responses, where drafts miss most, would rule it out for long): speculate
            return self._probe(b, True)
        if plain is None:
            return self._probe(b, False)
        best = spec <= plain
        if best != b.best:  # a switch (or the first choice): probe again soon
            b.best, b.probe_every, b.since_probe = best, self.probe_every, 0
        b.since_probe += 1
        if b.since_probe >= b.probe_every:
            b.since_probe = 0
            b.probe_every = min(2 * b.probe_every, self.max_probe_every)
            return self._probe(b, not best)
        return best

    def _probe(self, b: _Bucket, kind: bool) -> bool:
        b.probing, b.probe_left = kind, self.probe_steps - 1
        return kind

    def observe(self, num_decodes: int, speculated: bool, seconds: float, tokens: int) -> None:
        """A decode-only step: its wall time and the tokens it committed. The time of the first
        step after a switch of kind is not kept: it carries the switch (the drafter catching up
        on the context of the plain steps before)."""
        if num_decodes < 1:
            return
        if speculated:
            self._spec_tokens.add(tokens, num_decodes)
        steady = self._last_kind == speculated
        self._last_kind = speculated
        b = self.buckets.get(self.bucket_of(num_decodes))
        if steady and b is not None:
            b.steps[speculated].add(seconds, num_decodes)

    def summary(self) -> dict:
        """What it learned: tau, and per bucket ("4-7") ms per token of each kind (None: not
        measured yet)."""
        out: dict = {"tau": self.tau}
        for k in sorted(self.buckets):
            lo, hi = 1 << (k - 1), (1 << k) - 1
            out[f"{lo}-{hi}" if hi > lo else str(lo)] = {
                name: None if (c := self.cost(k, kind)) is None else 1e3 * c
                for name, kind in (("spec", True), ("plain", False))
            }
        return out


def make_policy(spec_max_batch: int | str | None) -> FixedLimit | Adaptive:
    return Adaptive() if spec_max_batch == "auto" else FixedLimit(spec_max_batch)
