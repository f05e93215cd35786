"""How the Ray executor lays the model out over actors (pydantic: Serve YAML and Python)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models.hf_config import TargetConfig
from ..models.sharding import ShardingConfig


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_target_shards: int = Field(
        1, ge=1, description="target shard actors; the MoE experts are split over all of them"
    )
    tp_size: int | None = Field(
        None,
        ge=1,
        description="shards splitting attention heads (the first tp_size; the others hold no "
        "attention); default the largest the target's heads allow, up to num_target_shards",
    )
    ep_size: int | None = Field(
        None, ge=1, description="shards splitting MoE experts: num_target_shards (the default)"
    )
    transport: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="target group and drafter channel backend; auto: nccl when every actor has "
        "a GPU of its own, else gloo (GPU tensors staged through host memory)",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement group strategy over drafter + shard bundles"
    )
    num_cpus_per_actor: float = Field(0.5, gt=0, description="CPUs reserved per actor")
    num_gpus_per_actor: float = Field(
        1.0, gt=0, le=1, description="GPUs per actor on cuda (0.5 puts two on one GPU)"
    )
    start_timeout_s: float = Field(
        180.0, gt=0, description="placement + model load + group formation, per (re)start"
    )
    step_timeout_s: float = Field(
        30.0, gt=0, description="one engine step; past it the step fails and shards rebuild"
    )
    step_calls: Literal["connections", "actor_calls", "compiled_graph"] = Field(
        "connections",
        description="how each step reaches the actors: connections (a loop in each actor reads "
        "its steps from a socket of its own; cluster/step_feed.py), actor_calls (one Ray actor "
        "call per actor per step), or compiled_graph (Ray compiled graphs: loops fed through "
        "shared memory that spin a CPU core while they wait, which made steps slower on a "
        "2-core CPU; cluster/step_graph.py)",
    )
    collective_timeout_s: float = Field(
        30.0, gt=0, description="one collective of the target shard group"
    )

    @model_validator(mode="after")
    def _sizes(self) -> ClusterConfig:
        n = self.num_target_shards
        if self.ep_size is not None and self.ep_size != n:
            raise ValueError(
                f"ep_size {self.ep_size} != num_target_shards {n}: the experts are split over "
                f"all target shards; leave ep_size unset or set it to {n}"
            )
        if self.tp_size is not None and self.tp_size > n:
            raise ValueError(
                f"tp_size {self.tp_size} > num_target_shards {n}: attention heads are split "
                f"over some of the target shards; use tp_size <= {n}"
            )
        return self

    def sharding(self, target: TargetConfig) -> ShardingConfig:
        """The TP x EP plan, validated against the target (errors name the fix)."""
        n = self.num_target_shards
        if self.tp_size is None:
            return ShardingConfig.widest(target, n)
        return ShardingConfig.for_target(target, self.tp_size, n)

    def backend(self, device: str) -> str:
        on_gpu = device.startswith("cuda")
        if self.transport == "nccl" and not on_gpu:
            raise ValueError(
                f"transport 'nccl' needs device='cuda' (device is {device!r}); use 'gloo' or 'auto'"
            )
        if self.transport == "nccl" and self.num_gpus_per_actor < 1:
            raise ValueError(
                f"transport 'nccl' with num_gpus_per_actor {self.num_gpus_per_actor:g}: NCCL "
                "refuses two ranks on one GPU; give each actor a whole GPU or use 'gloo'"
            )
        if self.transport == "auto":
            return "nccl" if on_gpu and self.num_gpus_per_actor == 1 else "gloo"
        return self.transport
