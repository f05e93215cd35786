"""Executors run the runner's methods for the engine: in-process here, in Ray actors in
`cluster/` (same interface), so the engine never knows which it has."""

from __future__ import annotations

from .config import EngineConfig
from .core.step_io import StepBatch, StepResult
from .worker.local_executor import ModelRunner, RunnerConfig


def make_executor(config: EngineConfig):
    """The executor `config` asks for: in-process, or Ray actors (imports ray only then)."""
    rc = RunnerConfig(
        target=config.target,
        drafter=config.drafter,
        device=config.device,
        dtype=config.dtype,
        drafter_dtype=config.drafter_dtype,
        block_size=config.block_size,
        kv_block_len=config.kv_block_len,
        num_kv_blocks=config.num_kv_blocks,
        kv_cache_gb=config.kv_cache_gb,
        spec_min_confidence=config.spec_min_confidence,
    )
    if config.executor == "ray":
        from .cluster.ray_executor import RayExecutor

        return RayExecutor(rc, num_target_shards=config.num_target_shards, **config.cluster)
    return LocalExecutor(rc)


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
