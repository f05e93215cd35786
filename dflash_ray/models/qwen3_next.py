"""Qwen3-Next targets (`Qwen3NextForCausalLM`): Qwen3.5's hybrid model (`qwen35.py`) read from
a different checkpoint layout.

The math is Qwen3.5-MoE's: Gated DeltaNet layers, gated full attention every
`full_attention_interval` layers (q_proj yields per head the query then the gate, q/k norms,
RoPE on the first `partial_rotary_factor` of the head dim), zero-centred norms (scale 1 + w)
except the DeltaNet's gated one (scale w), MoE blocks with a sigmoid-gated shared expert. What
differs is the checkpoint and a few config switches:

- the DeltaNet's input projections are fused and grouped per key head: `in_proj_qkvz` holds,
  for every key head j, the rows q_j [dk], k_j [dk], v of its value heads [g*dv], z of them
  [g*dv] (g = value heads per key head); `in_proj_ba` holds, per key head, b of its value heads
  [g] then a [g]. They are split here, at load, into Qwen3.5's `in_proj_qkv` (all q, all k, all
  v), `in_proj_z`, `in_proj_b` and `in_proj_a`, so the layer stays one implementation. The conv
  channels, `dt_bias`, `A_log`, the norm and `out_proj` already have Qwen3.5's order;
- the router renormalises its top-k only when `norm_topk_prob` (default true), not always;
- `decoder_sparse_step` / `mlp_only_layers` (or `num_experts` 0) make some layers a dense MLP of
  `intermediate_size`, which differs from the shared expert's `shared_expert_intermediate_size`
  (both handled in `hf_config.TargetConfig`);
- no `text_config` and no vision tower: weights sit under `model.`; `mtp.*` heads are skipped.

A rank holding key heads [k_lo, k_hi) reads one contiguous run of rows of each fused tensor
(key head j's group is contiguous), so sharding costs nothing extra.
"""

from __future__ import annotations

import torch

from .hf_config import LinearAttentionConfig
from .qwen35 import Qwen35Target

# fused checkpoint projection -> the projections it is split into, in its per-head row order
FUSED = {
    "in_proj_qkvz": ("in_proj_q", "in_proj_k", "in_proj_v", "in_proj_z"),
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}
# our projections, and which fields of the fused rows each concatenates (in that order)
OURS = {
    "in_proj_qkv": ("in_proj_q", "in_proj_k", "in_proj_v"),
    "in_proj_z": ("in_proj_z",),
    "in_proj_b": ("in_proj_b",),
    "in_proj_a": ("in_proj_a",),
}


def field_rows(fused: str, lin: LinearAttentionConfig) -> dict[str, int]:
    """Rows of each field in one key head's group of a fused projection."""
    g = lin.num_v_heads // lin.num_k_heads
    dk, dv = lin.k_head_dim, lin.v_head_dim
    sizes = (dk, dk, g * dv, g * dv) if fused == "in_proj_qkvz" else (g, g)
    return dict(zip(FUSED[fused], sizes, strict=True))


def unfuse(fused: str, ours: str, rows: torch.Tensor, lin: LinearAttentionConfig) -> torch.Tensor:
    """rows [n*G, H]: the groups of n consecutive key heads of the fused projection `fused`
    -> our projection `ours` for those heads (fields concatenated head by head)."""
    sizes = field_rows(fused, lin)
    per_head = sum(sizes.values())
    heads = rows.reshape(-1, per_head, rows.shape[-1])  # [n, G, H]
    fields = dict(zip(sizes, heads.split(list(sizes.values()), dim=1), strict=True))
    return torch.cat([fields[f].reshape(-1, rows.shape[-1]) for f in OURS[ours]])


class Qwen3NextTarget(Qwen35Target):
    """Qwen35Target whose checkpoint hooks split the fused DeltaNet projections."""

    def checkpoint_name(self, key: str) -> str | list[str] | None:
        name = super().checkpoint_name(key)
        if name is None or ".linear_attn." not in name:
            return name
        prefix, proj, kind = name.rsplit(".", 2)
        if proj not in FUSED:
            return name
        ours = [o for o, fields in OURS.items() if fields[0] in FUSED[proj]]
        return [f"{prefix}.{o}.{kind}" for o in ours]

    def checkpoint_slice(self, name: str, lazy) -> torch.Tensor:
        fused = lazy.key.split(".")[-2:][0]  # the projection a `...proj.weight` key names
        if fused not in FUSED:
            return super().checkpoint_slice(name, lazy)
        lin = self.cfg.linear
        per_head = sum(field_rows(fused, lin).values())
        k_lo, k_hi = self.shard.linear_range
        rows = lazy.slice(0, k_lo * per_head, k_hi * per_head)  # this rank's key heads
        return unfuse(fused, name.rsplit(".", 2)[1], rows, lin)
