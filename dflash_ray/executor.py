"""Executors run the runner's methods for the engine: in-process here, in Ray actors in
`cluster/` (same interface), so the engine never knows which it has."""

from __future__ import annotations

from .runner import ModelRunner, RunnerConfig
from .step_io import StepBatch, StepResult


class LocalExecutor:
    def __init__(self, cfg: RunnerConfig):
        self.runner = ModelRunner(cfg)

    def info(self) -> dict:
        return self.runner.kv_capacity()

    def execute(self, batch: StepBatch) -> StepResult:
        return self.runner.execute(batch)

    def release(self, seq_ids: list[int]) -> None:
        self.runner.release(seq_ids)

    def shutdown(self) -> None:
        pass
