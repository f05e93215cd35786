"""Ray shell around the engine's runners: a drafter actor and target shard actors behind the
`LocalExecutor` interface (`RayExecutor`). The only package below `server/` that imports ray."""

from .cluster_config import ClusterConfig
from .launch import ActorStartError
from .ray_executor import RayExecutor, StepError

__all__ = ["ActorStartError", "ClusterConfig", "RayExecutor", "StepError"]
