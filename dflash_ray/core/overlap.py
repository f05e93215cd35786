"""The overlapped step, mixed into `Engine` (`EngineConfig.overlap`): the workers compute step
N+1 while the engine settles step N (detokenization, stop strings, counts, outputs to streams).

One step is in flight at a time, in a worker thread (the executor's `execute` is called there
as it is anywhere else, so the in-process and the Ray executor both work unchanged; torch and
Ray's waits release the GIL, so the second thread's host work runs beside them). Per call:

    1. wait for step N's result (launching N first if nothing is in flight)
    2. advance N on ints (`Engine._advance`: lengths, tokens to max_tokens / stop ids, blocks
       back), schedule N+1 from that and launch it
    3. settle N (`Engine._settle`) while N+1 computes; return N's outputs

What step 2 cannot know is a stop string, found only by detokenizing in step 3: such a sequence
rides step N+1, whose result for it is discarded (it is finished by then), and its blocks go back
at once; nothing allocates them before N+1 returns, since only a schedule does, and the next one
waits for N+1. Greedy output and seeded text stay those of the plain engine: batches do not
change what a sequence computes (tests/test_overlap.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from .outputs import RequestOutput
from .scheduler import SchedulerOutput
from .step_io import StepBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Flight:
    """A step whose batch went to the workers and whose result is not in yet."""

    sched: SchedulerOutput
    batch: StepBatch
    start: float  # perf_counter at launch
    result: Future


class Overlap:
    def _overlapped_step(self, launch_next: bool = True) -> list[RequestOutput]:
        """Steps 1-3 above (with `_step_lock` held); `launch_next` False: collect and settle
        what is in flight and launch nothing (the engine goes idle)."""
        if self._inflight is None:
            if not launch_next:
                return []
            if not self._launch(self._drafter_ready()):
                with self._lock:
                    released = self._take_released()
                self._release(released)
                return []
        flight, self._inflight = self._inflight, None
        result = self._outcome(flight.result.result)
        if result is None:
            return []
        drafter_up = self._drafter_ready() if launch_next else False
        with self._lock:
            taken = self._advance(flight.sched, flight.batch, result)
            if launch_next:
                self._launch(drafter_up)
            return self._finish_step(flight.start, flight.sched, flight.batch, result, taken)

    def _launch(self, drafter_up: bool) -> bool:
        """Schedule the next step and hand its batch to the step thread; False if there was
        nothing to run."""
        with self._lock:
            planned = self._plan(drafter_up)
            if planned is None:
                return False
            sched, batch = planned
            self._inflight = Flight(sched, batch, time.perf_counter(),
                                    self._pool.submit(self.executor.execute, batch))
            return True

    def _drain(self) -> None:
        """Collect and settle the step in flight, if any (with `_step_lock` held); its failure
        has failed its requests already, so it is logged, not raised."""
        try:
            self._overlapped_step(launch_next=False)
        except Exception:
            log.warning("the step in flight failed", exc_info=True)
