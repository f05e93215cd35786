"""The record of one step on the workers: which worker methods ran, when, and what tensors
crossed between processes, as `Span`s carried back in the `StepResult`.

Worker methods that a step calls are marked `@traced`; while a step runs (`tracing()`), each
call appends its span. Outside a step (a test calling a worker directly) nothing is recorded.
The spans are the step's timings (draft, verify, transfer) and also show which worker methods
a step ran, in any process, so the in-process and Ray paths can be checked to be the same.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from ..core.step_io import Span

_SPANS: ContextVar[list[Span] | None] = ContextVar("dflash_step_spans", default=None)


@contextlib.contextmanager
def tracing() -> Iterator[list[Span]]:
    spans: list[Span] = []
    token = _SPANS.set(spans)
    try:
        yield spans
    finally:
        _SPANS.reset(token)


def record(worker: str, method: str, start: float, nbytes: int = 0) -> None:
    """Add a span that ends now (tensor transfers record themselves with this)."""
    spans = _SPANS.get()
    if spans is not None:
        spans.append(Span(worker, method, start, time.monotonic(), nbytes))


def traced(method):
    """Mark a worker method a step calls. The worker names itself (`role`) and its `device`;
    on a GPU the span waits for the device, so it measures the work, not the launch."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if _SPANS.get() is None:
            return method(self, *args, **kwargs)
        start = time.monotonic()
        out = method(self, *args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record(self.role, method.__name__, start)
        return out

    return wrapper
