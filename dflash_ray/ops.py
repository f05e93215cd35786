"""Reference tensor ops of the target and the drafter, plus the registry that may swap in kernels.

Every hot op here is plain torch and is the definition of correct; a kernel under `dflash_kernels`
with the same signature may replace it through `get_op` (override with `DFLASH_OPS=ref`). The
numerics deliberately follow Hugging Face's Qwen3 code (RMSNorm in fp32, RoPE tables in fp32) so
our logits match transformers' within float rounding.

Letters in shape comments: T tokens in a flattened ragged batch, N sequences, Q padded query
length, K padded key length, H hidden, nh/nkv heads, hd head dim, E experts, k experts per token.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class PackedWeight:
    """A linear layer's weight laid out once in oneDNN's blocked CPU format (fp32 or bf16).

    Measured on this project's 2-core AVX-512 CPU, a [640, 192] weight among others cycling
    through cache: unpacked fp32 (MKL) took 43 / 57 / 77 us for 1 / 5 / 16 rows, packed 31 / 26
    / 40 us; bf16 re-lays the weight out on every call unpacked (27 vs 15 us at 1 row). A whole
    engine's one-row fp32 steps still ran faster unpacked, so `linear` keeps that case on the
    source weight. Holds a copy: packing doubles a model's weight memory on CPU
    (`DFLASH_OPS=ref` turns it off). Inference only: no autograd, stale if the source changes.
    """

    __slots__ = ("data", "source")

    def __init__(self, weight: torch.Tensor):
        self.source = weight.detach()  # the original (shared, not copied): the one-row path
        self.data = torch.ops.mkldnn._reorder_linear_weight(self.source.contiguous())


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `PackedWeight` applies: an x86 CPU (where it was measured), fp32 or bf16 (bf16
    only where oneDNN has a bf16 GEMM for this CPU), oneDNN built in, `DFLASH_OPS` not `ref`."""
    if (weight.device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64")
            or not torch.backends.mkldnn.is_available()
            or os.environ.get("DFLASH_OPS", "auto") == "ref"):
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN when the weight is packed (same values up to GEMM rounding).

    One fp32 row (a plain decode step) keeps the unpacked path: there MKL's call overhead is
    lower than oneDNN's (7 vs 16 us for a 640 x 192 weight in cache; measured in a whole
    engine, packing every GEMM made plain decoding 0.82x while verify steps gained).
    """
    if isinstance(weight, PackedWeight):
        if x.dtype == torch.float32 and x.numel() == x.shape[-1]:
            return F.linear(x, weight.source, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight.data, bias, "none", [], "")
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
        qg = q[g.query_rows].transpose(1, 2)  # [N, nh, Q, hd]
        n, width = g.key_slots.shape
        flat = g.key_slots.reshape(-1)
        kg = k_cache.index_select(0, flat).view(n, width, *k_cache.shape[1:]).transpose(1, 2)
        vg = v_cache.index_select(0, flat).view(n, width, *v_cache.shape[1:]).transpose(1, 2)
        # kg, vg: [N, nkv, K, hd]
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=qg.shape[1] != kg.shape[1]
        )
        og = og.transpose(1, 2)  # [N, Q, nh, hd]
        out[g.query_rows[g.query_valid]] = og[g.query_valid]
    return out


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


# ---- registry ---------------------------------------------------------------------------------

_REFERENCE: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "apply_rope": apply_rope,
    "paged_attention": paged_attention,
    "moe_experts": moe_experts,
}
_chosen: dict[str, Callable] = {}


def get_op(name: str) -> Callable:
    """The implementation of `name`, chosen once: a dflash_kernels kernel when it imports and the
    override `DFLASH_OPS=ref` is not set, else the reference above."""
    if name in _chosen:
        return _chosen[name]
    impl = _REFERENCE[name]
    if os.environ.get("DFLASH_OPS", "auto") != "ref":
        try:
            import dflash_kernels

            kernel = dflash_kernels.get(name)
            if kernel is not None:
                impl = kernel
                log.info("op %s: using kernel %s", name, kernel.__qualname__)
        except ImportError as exc:  # the kernels package is optional
            log.info("op %s: reference (dflash_kernels unavailable: %s)", name, exc)
    _chosen[name] = impl
    return impl
