"""Sharding plans: which slice of the target each rank holds (`ShardSpec`), and the plan that
validates a split against a target (`ShardingConfig`).

A plan has `ep_size` ranks, every one a target shard. Expert parallelism (EP) gives each of them a
contiguous run of experts and a share of every dense-MLP layer's intermediate dimension (uneven
runs allowed: 8 experts on 3 ranks hold 3, 3, 2). Tensor parallelism (TP) splits every attention
layer's query heads over the first `tp_size` of those ranks; the other `ep_size - tp_size` ranks
hold no attention at all (no attention weights, no KV cache) and add zeros to its all-reduce. So
7 ranks, the shape left beside a drafter on an 8-GPU node, can serve a target whose 32 heads 7
does not divide: attention over 4 ranks, experts over 7. The model sums every row-parallel output
with one all-reduce over all `ep_size` ranks (see `models/layers.py`), so the math is the
unsharded model's whatever the split. The plan is a `ShardSpec`; the model loads only that slice
from disk.

A hybrid target's Gated DeltaNet layers split like attention: their key heads (and the value
heads that read them) over the same first `tp_size` ranks, none (no weights, no recurrent
state) on the rest.

KV heads follow the query heads: split when TP divides them; when there are fewer KV heads than
TP ranks (TP a multiple of them) each rank keeps the one KV head its query heads read, so that
head is replicated on TP / num_kv_heads ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from .hf_config import TargetConfig


@dataclass(slots=True)
class ShardSpec:
    """This rank's share of the target: heads [head_lo, head_hi) of every attention layer,
    kv heads [kv_lo, kv_hi), experts [expert_lo, expert_hi), dense-MLP columns [mlp_lo, mlp_hi).
    The default (None) is the whole model; empty head and kv ranges mean no attention."""

    head_range: tuple[int, int]
    kv_range: tuple[int, int]
    expert_range: tuple[int, int]
    mlp_range: tuple[int, int]
    # Gated DeltaNet key heads [lo, hi) (hybrid targets; their value heads follow them)
    linear_range: tuple[int, int] = (0, 0)
    # shared-expert columns [lo, hi) (Qwen3.5-MoE, Qwen3-Next): split like the dense MLP's
    shared_range: tuple[int, int] = (0, 0)

    @property
    def has_attention(self) -> bool:
        """False on the ranks beyond tp_size, which hold no attention weights and no KV cache."""
        return self.head_range[1] > self.head_range[0]

    @property
    def has_linear_attention(self) -> bool:
        """False on the ranks beyond tp_size: no DeltaNet weights and no recurrent state."""
        return self.linear_range[1] > self.linear_range[0]


def full_shard(cfg: TargetConfig) -> ShardSpec:
    d = cfg.decoder
    linear = (0, cfg.linear.num_k_heads) if cfg.linear else (0, 0)
    return ShardSpec(
        (0, d.num_heads), (0, d.num_kv_heads), (0, cfg.num_experts), (0, d.intermediate_size),
        linear, (0, cfg.shared_intermediate_size),
    )


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of piece `index` when n items are cut into `parts` contiguous pieces, the first
    n % parts pieces one item larger."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def tp_sizes(cfg: TargetConfig) -> list[int]:
    """Every TP size the target's attention can be split over: it divides the query heads, and
    it divides or is a multiple of the KV heads."""
    d = cfg.decoder
    return [k for k in _divisors(d.num_heads)
            if (d.num_kv_heads % k == 0 or k % d.num_kv_heads == 0)
            and (cfg.linear is None or cfg.linear.num_k_heads % k == 0)]


class ShardingConfig(BaseModel):
    """How the target is split over its ranks; validated against a target with `for_target`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp_size: int = Field(
        1, ge=1, description="ranks splitting attention heads (the first tp_size of ep_size)"
    )
    ep_size: int = Field(
        1, ge=1, description="target ranks: each holds a run of experts and of dense-MLP columns"
    )

    @classmethod
    def for_target(cls, cfg: TargetConfig, tp_size: int, ep_size: int) -> ShardingConfig:
        return cls.model_validate({"tp_size": tp_size, "ep_size": ep_size}, context={"target": cfg})

    @classmethod
    def widest(cls, cfg: TargetConfig, num_ranks: int) -> ShardingConfig:
        """Experts over all `num_ranks`, attention over the largest TP size that fits in them."""
        tp = max(k for k in tp_sizes(cfg) if k <= num_ranks)
        return cls.for_target(cfg, tp, num_ranks)

    @model_validator(mode="after")
    def _fits(self, info: ValidationInfo) -> ShardingConfig:
        tp, ep = self.tp_size, self.ep_size
        if tp > ep:
            raise ValueError(
                f"tp_size {tp} > ep_size {ep}: attention heads are split over the first tp_size "
                f"of the ep_size target ranks; use tp_size <= {ep}"
            )
        cfg: TargetConfig | None = (info.context or {}).get("target")
        if cfg is None:
            return self
        d = cfg.decoder
        if d.num_heads % tp:
            raise ValueError(
                f"num_attention_heads {d.num_heads} is not divisible by tp_size {tp}; "
                f"use a tp_size in {_divisors(d.num_heads)}"
            )
        if d.num_kv_heads % tp and tp % d.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads {d.num_kv_heads} and tp_size {tp}: one must divide the "
                "other (KV heads are split when tp_size divides them, replicated when they "
                f"divide tp_size); use a tp_size in {tp_sizes(cfg)}"
            )
        if cfg.linear is not None and cfg.linear.num_k_heads % tp:
            raise ValueError(
                f"linear_num_key_heads {cfg.linear.num_k_heads} is not divisible by tp_size "
                f"{tp}: Gated DeltaNet heads split over the same tp_size ranks as attention; "
                f"use a tp_size in {tp_sizes(cfg)}"
            )
        has_dense = any(not cfg.is_moe_layer(i) for i in range(d.num_layers))
        if has_dense and d.intermediate_size < ep:
            raise ValueError(
                f"intermediate_size {d.intermediate_size} < ep_size {ep}: every rank needs a "
                f"share of the dense MLP; use at most {d.intermediate_size} target ranks"
            )
        if cfg.shared_intermediate_size and cfg.shared_intermediate_size < ep:
            raise ValueError(
                f"shared_expert_intermediate_size {cfg.shared_intermediate_size} < ep_size {ep}: "
                "every rank needs a share of the shared expert; use at most "
                f"{cfg.shared_intermediate_size} target ranks"
            )
        if cfg.num_experts and ep > cfg.num_experts:
            raise ValueError(
                f"ep_size {ep} exceeds num_experts {cfg.num_experts}: every rank needs at least "
                f"one expert; use at most {cfg.num_experts} target ranks"
            )
        return self

    def shard(self, cfg: TargetConfig, rank: int) -> ShardSpec:
        """Rank `rank`'s slice (call on a config returned by `for_target`)."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank {rank} is outside 0..{self.ep_size - 1}")
        d, tp, ep = cfg.decoder, self.tp_size, self.ep_size
        if rank >= tp:
            heads = kv = (0, 0)  # no attention on this rank
        elif d.num_kv_heads % tp == 0:
            heads, kv = split(d.num_heads, tp, rank), split(d.num_kv_heads, tp, rank)
        else:
            head = rank * d.num_kv_heads // tp
            heads, kv = split(d.num_heads, tp, rank), (head, head + 1)
        linear = (0, 0)
        if cfg.linear is not None and rank < tp:
            linear = split(cfg.linear.num_k_heads, tp, rank)
        return ShardSpec(
            head_range=heads,
            kv_range=kv,
            expert_range=split(cfg.num_experts, ep, rank),
            mlp_range=split(d.intermediate_size, ep, rank),
            linear_range=linear,
            shared_range=split(cfg.shared_intermediate_size, ep, rank),
        )


def shard_spec(cfg: TargetConfig, rank: int, tp_size: int, ep_size: int) -> ShardSpec:
    """The slice of `cfg`'s target that rank `rank` of a plan holds (attention over `tp_size`
    ranks, experts over `ep_size`)."""
    return ShardingConfig.for_target(cfg, tp_size, ep_size).shard(cfg, rank)
