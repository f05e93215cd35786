"""Choosing where the workers run, for the entry points (`LLM`, the Serve app, the CLI, the
benches): in this process (`worker.LocalExecutor`), or in Ray actors (`cluster.RayExecutor`,
imported only then). The engine itself never names either."""

from __future__ import annotations

from .config import EngineConfig
from .core.engine import Engine
from .worker.local_executor import LocalExecutor
from .worker.worker_config import WorkerConfig


def make_executor(config: EngineConfig):
    """The executor `config` asks for."""
    cfg = WorkerConfig.from_engine(config)
    if config.executor == "ray":
        from .cluster.ray_executor import RayExecutor

        return RayExecutor(cfg, num_target_shards=config.num_target_shards, **config.cluster)
    return LocalExecutor(cfg)


def make_engine(config: EngineConfig) -> Engine:
    return Engine(config, make_executor(config))
