"""Reference tensor ops of the target and the drafter: plain torch, the definition of correct.

A kernel (`dflash_kernels`) or a platform path (`cpu_packed`) with the same signature may stand
in for any of them through the registry (`ops.OPS`); `DFLASH_OPS=ref` forces these. The
numerics deliberately follow Hugging Face's Qwen3 code (RMSNorm in fp32, RoPE tables in fp32) so
our logits match transformers' within float rounding.

Letters in shape comments: T tokens in a flattened ragged batch, N sequences, Q padded query
length, K padded key length, H hidden, nh/nkv heads, hd head dim, E experts, k experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu_packed import PackedWeight


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in].T (+ bias): `F.linear`, or a packed weight's oneDNN GEMM."""
    if isinstance(weight, PackedWeight):
        return weight.apply(x, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as Qwen3RMSNorm does."""
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return y if weight is None else weight * y


class RotaryTable:
    """cos/sin of rotary embeddings at absolute positions, computed in fp32 like transformers.

    The sign of rotate_half is folded into the sin table, so applying RoPE is
    `x * cos + roll(x, hd/2) * sin_signed`: the same products as HF's formula, four ops.
    """

    def __init__(self, head_dim: int, theta: float, scaling_factor: float = 1.0):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / (theta**exponents) / scaling_factor  # [hd/2]
        half = head_dim // 2
        ones = torch.ones(half, device="cpu")
        self.sign = torch.cat((-ones, ones))  # [hd]

    def to(self, device) -> RotaryTable:
        self.inv_freq, self.sign = self.inv_freq.to(device), self.sign.to(device)
        return self

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin_signed), each [T, hd] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), (emb.sin() * self.sign).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd]; cos/sin_signed [T, hd] from `RotaryTable`."""
    rotated = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return x * cos[:, None, :] + rotated * sin_signed[:, None, :]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(slots=True)
class AttentionGroup:
    """Sequences whose attention runs as one padded SDPA call.

    Built once per forward and shared by every layer, so the per-layer cost is three gathers
    and one SDPA call regardless of how ragged the batch is.
    """

    # [N, Q] rows of the flattened token batch that are this group's queries (padding repeats row 0)
    query_rows: torch.Tensor
    # [N, Q] bool, which of those are real
    query_valid: torch.Tensor
    # [N, K] cache slots holding each sequence's keys in position order (padding -> slot 0)
    key_slots: torch.Tensor
    # [N, 1, Q, K] bool, True where a query may attend to a key
    mask: torch.Tensor
    # True when the queries are rows 0 .. N*Q-1 of the batch in order, none padded (every
    # sequence asks Q queries): `query_rows` is then arange(N*Q).view(N, Q), known on the host
    dense: bool = False


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[AttentionGroup],
    scale: float,
) -> torch.Tensor:
    """Attention of flattened queries over keys already written to a paged cache.

    q [T, nh, hd]; k_cache/v_cache [S, nkv, hd] (S = all cache slots of one layer).
    Returns [T, nh, hd]. Rows of q not covered by any group stay zero.
    """
    out = torch.zeros_like(q)
    for g in groups:
        og = group_attention(q[g.query_rows], k_cache, v_cache, g, scale)  # [N, Q, nh, hd]
        out[g.query_rows[g.query_valid]] = og[g.query_valid]
    return out


def group_attention(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    g: AttentionGroup, scale: float) -> torch.Tensor:
    """One group's SDPA: its queries qg [N, Q, nh, hd] over its keys gathered from the paged
    cache -> [N, Q, nh, hd] (padded query rows included)."""
    n, width = g.key_slots.shape
    flat = g.key_slots.reshape(-1)
    kg = k_cache.index_select(0, flat).view(n, width, *k_cache.shape[1:]).transpose(1, 2)
    vg = v_cache.index_select(0, flat).view(n, width, *v_cache.shape[1:]).transpose(1, 2)
    qg = qg.transpose(1, 2)  # [N, nh, Q, hd]; kg, vg: [N, nkv, K, hd]
    og = F.scaled_dot_product_attention(
        qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=qg.shape[1] != kg.shape[1]
    )
    return og.transpose(1, 2)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Write k, v [T, nkv, hd] into slots [T] of one layer's k_cache / v_cache [S, nkv, hd]."""
    k_cache[slots] = k
    v_cache[slots] = v


@dataclass(slots=True)
class IntakeLayer:
    """What the drafter's context intake needs of one drafter layer's attention."""

    kv_weight: torch.Tensor | PackedWeight  # [2 * nkv * hd, H]: the k/v rows of qkv_proj
    kv_bias: torch.Tensor | None
    k_norm: torch.Tensor  # [hd]


def context_intake(
    features: torch.Tensor,  # [Tc, K*Ht] target features of newly committed tokens
    fc: torch.Tensor | PackedWeight,  # [H, K*Ht]
    hidden_norm: torch.Tensor,  # [H]
    eps: float,
    layers: Sequence[IntakeLayer],
    num_kv_heads: int,
    cos: torch.Tensor,  # [Tc, hd] at the tokens' positions
    sin_signed: torch.Tensor,
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]],  # per layer: its (k_cache, v_cache)
    slots: torch.Tensor,  # [Tc]
) -> None:
    """The DFlash drafter's context intake: C = hidden_norm(fc(features)), then every layer's
    k/v projection of C (k normed and rotated) written straight into its cache. Context rows
    never run attention or an MLP: their K/V is all the drafter ever reads of them."""
    c = rms_norm(linear(features, fc), hidden_norm, eps)
    for layer, (k_cache, v_cache) in zip(layers, kv, strict=True):
        proj = linear(c, layer.kv_weight, layer.kv_bias).view(c.shape[0], 2 * num_kv_heads, -1)
        k = apply_rope(rms_norm(proj[:, :num_kv_heads], layer.k_norm, eps), cos, sin_signed)
        store_kv(k_cache, v_cache, slots, k, proj[:, num_kv_heads:])


def route_experts(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor | Sequence[PackedWeight],
    down: torch.Tensor | Sequence[PackedWeight],
    weights: torch.Tensor,
    ids: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """SwiGLU experts: x [T, H], gate_up [E, 2I, H], down [E, H, I] (or per-expert packed
    weights), weights/ids [T, k].

    Only experts `expert_offset .. expert_offset+E-1` live here (expert parallelism); routes to
    other experts contribute nothing on this rank. The (token, expert) pairs are sorted by expert
    on the host, their tokens gathered once, and each hit expert runs two GEMMs over its
    contiguous slice; the weighted outputs go back to (token, slot) order and each token sums
    its k slots in slot order. Each expert's weights are read once, and the op count per expert
    is the GEMMs and the activation only (a grouped-GEMM kernel replaces this on GPU). The sum
    order is fixed (no atomics, whatever the device) and the same for a token decoded alone or
    inside a verify block.
    """
    num_local, k = len(gate_up), ids.shape[1]
    per_slot = x.new_zeros(ids.numel(), x.shape[1])  # [T*k, H]; other ranks' experts stay 0
    pairs = sorted(
        (e - expert_offset, pair)
        for pair, e in enumerate(ids.reshape(-1).tolist())
        if 0 <= e - expert_offset < num_local
    )
    if pairs:
        pair_t = torch.tensor([pair for _, pair in pairs], device=x.device)
        xs = x.index_select(0, pair_t // k)  # [P, H], grouped by expert
        ys, lo = [], 0
        while lo < len(pairs):
            e, hi = pairs[lo][0], lo
            while hi < len(pairs) and pairs[hi][0] == e:
                hi += 1
            ys.append(linear(silu_and_mul(linear(xs[lo:hi], gate_up[e])), down[e]))
            lo = hi
        per_slot[pair_t] = torch.cat(ys) * weights.reshape(-1, 1).index_select(0, pair_t)
    return per_slot.view(-1, k, x.shape[1]).sum(dim=1)
