"""Qwen3 decoder building blocks shared by the target and the drafter.

Parameter names mirror Hugging Face's Qwen3 modules so checkpoints load by renaming a prefix.
Attention reads and writes a paged KV cache; which keys a query sees (causal for the target,
non-causal for the drafter's block) is decided by the `AttentionGroup` masks, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


from ..ops import AttentionGroup, get_op, route_experts
from ..parallel.communicator import LOCAL, Communicator
from .config import DecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self._op = get_op("rms_norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.weight, self.eps)


class Attention(nn.Module):
    """Qwen3 attention (q/k RMSNorm per head, RoPE) over a paged cache.

    With tensor parallelism `num_heads`/`num_kv_heads` are this rank's share and o_proj is
    row-parallel, so its output is all-reduced through `comm`.
    """

    def __init__(self, cfg: DecoderConfig, num_heads: int, num_kv_heads: int, comm: Communicator):
        super().__init__()
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(num_heads * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.scale = hd**-0.5
        self.comm = comm
        self._rope = get_op("apply_rope")
        self._attend = get_op("paged_attention")

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (k, v) each [T, nkv, hd], k normed and rotated."""
        k = self.k_norm(self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        return self._rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos: torch.Tensor,  # [T, hd]
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's cache, each [S, nkv, hd]
        write_slots: torch.Tensor,  # [T]
        groups: list[AttentionGroup],
    ) -> torch.Tensor:
        q = self.q_norm(self.q_proj(x).view(-1, self.num_heads, self.head_dim))
        q = self._rope(q, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        k_cache, v_cache = kv
        k_cache[write_slots] = k
        v_cache[write_slots] = v
        out = self._attend(q, k_cache, v_cache, groups, self.scale)
        return self.comm.all_reduce(self.o_proj(out.reshape(x.shape[0], -1)))


class MLP(nn.Module):
    """Dense SwiGLU MLP; with TP the intermediate dim is split and down_proj all-reduced."""

    def __init__(self, hidden: int, intermediate: int, comm: Communicator):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Experts(nn.Module):
    """Experts `offset .. offset+E-1` as stacked weights (the per-expert checkpoint tensors are
    stacked by the loader)."""

    def __init__(self, num_local: int, hidden: int, intermediate: int, offset: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, intermediate))
        self.offset = offset


class SparseMoE(nn.Module):
    """Qwen3-MoE block: softmax router, top-k, optional renormalisation, SwiGLU experts.

    Every rank routes every token (the router is replicated) and computes only its own experts;
    the partial sums are all-reduced (expert parallelism without all-to-all: fine at decode sizes).
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        normalize: bool,
        expert_range: tuple[int, int],
        comm: Communicator,
    ):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        lo, hi = expert_range
        self.experts = Experts(hi - lo, hidden, intermediate, lo)
        self.top_k, self.normalize, self.comm = top_k, normalize, comm
        self._experts = get_op("moe_experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_experts(self.gate(x), self.top_k, self.normalize)
        e = self.experts
        y = self._experts(x, e.gate_up_proj, e.down_proj, weights, ids, e.offset)
        return self.comm.all_reduce(y)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, attn: Attention, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, kv, write_slots, groups) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, write_slots, groups)
        return x + self.mlp(self.post_attention_layernorm(x))
