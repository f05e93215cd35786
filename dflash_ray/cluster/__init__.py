"""Ray shell around the engine's runners: a drafter actor and target shard actors behind the
`LocalExecutor` interface (`RayExecutor`). The only package below `server/` that imports ray."""

from .config import ClusterConfig
from .executor import RayExecutor, StepError
from .launch import ActorStartError

__all__ = ["ActorStartError", "ClusterConfig", "RayExecutor", "StepError"]
