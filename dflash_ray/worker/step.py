"""One engine step on the workers, written once: draft -> verify -> accept -> feature hand-off.

`target_step` runs where the target (or one of its shards) lives. In one process it calls the
draft worker directly (`LocalExecutor`); under Ray the drafter actor runs `DraftWorker.draft`
between the channel's receive and send, and the target side reaches it through the channel
(`cluster/`), which only decides how the tensors travel. Either way the same
worker methods run in the same order (the spans in the result show it):

    target: release -> take_features -> [drafter: draft] -> share_drafts -> verify

A drafter that fails mid-step (`DrafterLost`, raised by the channel) costs no token: the step is
verified without drafts and reports the loss, and the engine decodes every live sequence plain
from then on.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..core.step_io import StepBatch, StepResult
from .drafts import Drafts
from .target_worker import TargetWorker
from .trace import tracing


class DrafterLost(RuntimeError):
    """The drafter did not answer this step (its process died or its channel broke)."""


class DraftSource(Protocol):
    """Where the target side gets its drafts: a `DraftWorker` in the same process, or the
    channel to the drafter actor."""

    def draft(self, batch: StepBatch, features: torch.Tensor) -> Drafts: ...


def target_step(target: TargetWorker, batch: StepBatch,
                drafter: DraftSource | None) -> StepResult:
    """The target side of a step, on every rank; `drafter` is needed on the lead rank when the
    batch has a drafter pass."""
    with tracing() as spans:
        target.release(batch)
        drafts, lost = None, False
        if batch.drafter_decodes():
            if target.is_lead:
                features = target.take_features(batch)
                try:
                    drafts = drafter.draft(batch, features)
                except DrafterLost:
                    lost = True
            drafts = target.share_drafts(batch, drafts)
        results = target.verify(batch, drafts, lost)
    return StepResult(results or [], spans, drafter_lost=lost)
