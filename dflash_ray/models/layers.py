"""Qwen3 decoder building blocks shared by the target and the drafter.

Parameter names mirror Hugging Face's Qwen3 modules so checkpoints load by renaming a prefix.
Attention reads and writes a paged KV cache; which keys a query sees (causal for the target,
non-causal for the drafter's block) is decided by the `AttentionGroup` masks, not here. Every
hot op goes through the registry (`ops.OPS`), so a kernel can take its place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import OPS, AttentionGroup, IntakeLayer, PackedWeight, can_pack
from ..parallel.communicator import Communicator
from .cache_spec import AttentionCacheSpec
from .hf_config import DecoderConfig


class Linear(nn.Linear):
    """`nn.Linear` that can run on a packed copy of its weight (`prepack`)."""

    packed: PackedWeight | None = None

    def prepack(self) -> None:
        self.packed = PackedWeight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the packed op has no autograd: anything that wants gradients takes the weight itself
        packed = None if torch.is_grad_enabled() else self.packed
        return OPS.linear(x, packed or self.weight, self.bias)


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """A token embedding whose weight is left uninitialised (the checkpoint fills it). Models
    are built on the meta device, and `nn.Embedding`'s own init (`normal_`) runs there through
    Python decompositions whose first use imports ~900 modules: 2.7 s of every process that
    loads a model (a restarted drafter actor among them)."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


def prepack(model: nn.Module) -> bool:
    """Pack the linear weights of an inference model for the CPU GEMM path (see `PackedWeight`)
    once its weights are final: every module with a `prepack` method packs its own. No-op
    (False) where packing does not apply."""
    if not can_pack(next(model.parameters())):
        return False
    for m in model.modules():
        if hasattr(m, "prepack"):
            m.prepack()
    return True


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Qwen3 attention (q/k RMSNorm per head, RoPE) over a paged cache.

    q/k/v are one packed projection `qkv_proj` (rows: q heads, k heads, v heads); the loader packs
    the checkpoint's q_proj/k_proj/v_proj into it (see `packed_rows`). With tensor parallelism the
    head counts are this rank's share and o_proj is row-parallel, so its output is all-reduced.
    """

    def __init__(self, cfg: DecoderConfig, num_heads: int, num_kv_heads: int, comm: Communicator):
        super().__init__()
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, hd
        self.qkv_proj = Linear(
            cfg.hidden_size, (num_heads + 2 * num_kv_heads) * hd, bias=cfg.attention_bias
        )
        self.o_proj = Linear(num_heads * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps
        self.scale = hd**-0.5
        self.comm = comm

    packed_name = "qkv_proj"
    kv_packed: PackedWeight | None = None  # the k/v rows of qkv_proj, for the context intake

    def pack_kv_rows(self) -> None:
        """Pack the k/v rows for the context intake (the drafter's context path; the target never
        calls it, so only the drafter pays this copy)."""
        self.kv_packed = PackedWeight(self.qkv_proj.weight[self.num_heads * self.head_dim :])

    def packed_rows(self) -> dict[str, int]:
        """Checkpoint projection name -> first row of it inside qkv_proj."""
        hd = self.head_dim
        return {
            "q_proj": 0,
            "k_proj": self.num_heads * hd,
            "v_proj": (self.num_heads + self.num_kv_heads) * hd,
        }

    def cache_spec(self) -> AttentionCacheSpec:
        return AttentionCacheSpec(self.num_kv_heads, self.head_dim)

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only of context rows, x [T, H] -> each [T, nkv, hd]: the training
        forward's (autograd, no cache) form of what `ops.context_intake` writes for serving."""
        kv_rows = self.num_heads * self.head_dim
        b = None if self.qkv_proj.bias is None else self.qkv_proj.bias[kv_rows:]
        kv = OPS.linear(x, self.qkv_proj.weight[kv_rows:], b)
        kv = kv.view(-1, 2 * self.num_kv_heads, self.head_dim)
        k = OPS.apply_rope(OPS.rms_norm(kv[:, : self.num_kv_heads], self.k_norm.weight, self.eps),
                           cos, sin)
        return k, kv[:, self.num_kv_heads :]

    def intake_layer(self) -> IntakeLayer:
        """This layer's part of the drafter's context intake (`ops.context_intake`): the k/v
        rows of qkv_proj (packed where `pack_kv_rows` ran) and the k norm."""
        kv_rows = self.num_heads * self.head_dim
        packed = None if torch.is_grad_enabled() else self.kv_packed
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[kv_rows:]
        return IntakeLayer(packed or self.qkv_proj.weight[kv_rows:], bias, self.k_norm.weight)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, nh, hd], k and v [T, nkv, hd]; q and k normed and rotated."""
        nh, nkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(-1, nh + 2 * nkv, self.head_dim)
        # q and k heads are normed and rotated together: one norm, one RoPE
        w = torch.cat((self.q_norm.weight.expand(nh, -1), self.k_norm.weight.expand(nkv, -1)))
        qk = OPS.apply_rope(OPS.rms_norm(qkv[:, : nh + nkv], w, self.eps), cos, sin)
        return qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos: torch.Tensor,  # [T, hd]
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's cache, each [S, nkv, hd]
        write_slots: torch.Tensor,  # [T]
        groups: list[AttentionGroup],
    ) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        k_cache, v_cache = kv
        OPS.store_kv(k_cache, v_cache, write_slots, k, v)
        out = OPS.paged_attention(q, k_cache, v_cache, groups, self.scale)
        return self.comm.all_reduce(self.o_proj(out.reshape(x.shape[0], -1)))


class NoAttention(nn.Module):
    """The attention of a rank beyond the plan's tp_size (see `models/sharding.py`): it holds no
    heads, no weights and no KV cache, and adds zeros to the all-reduce that sums the attention
    output of the ranks that hold heads."""

    def __init__(self, cfg: DecoderConfig, comm: Communicator):
        super().__init__()
        self.head_dim, self.comm = cfg.head_dim, comm

    def cache_spec(self) -> AttentionCacheSpec:
        return AttentionCacheSpec(0, self.head_dim)

    def forward(self, x: torch.Tensor, cos, sin, kv, write_slots, groups) -> torch.Tensor:
        return self.comm.all_reduce(torch.zeros_like(x))


class MLP(nn.Module):
    """Dense SwiGLU MLP with gate and up packed in one projection; with TP the intermediate dim
    is split and down_proj all-reduced."""

    def __init__(self, hidden: int, intermediate: int, comm: Communicator):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.intermediate = intermediate
        self.comm = comm

    packed_name = "gate_up_proj"

    def packed_rows(self) -> dict[str, int]:
        return {"gate_proj": 0, "up_proj": self.intermediate}

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (before the all-reduce)."""
        return self.down_proj(OPS.silu_and_mul(self.gate_up_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.partial(x))


class Experts(nn.Module):
    """Experts `offset .. offset+E-1` as stacked weights (the per-expert checkpoint tensors are
    stacked by the loader)."""

    def __init__(self, num_local: int, hidden: int, intermediate: int, offset: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, intermediate))
        self.offset = offset
        self.packed: tuple[list[PackedWeight], list[PackedWeight]] | None = None

    def prepack(self) -> None:
        self.packed = ([PackedWeight(w) for w in self.gate_up_proj],
                       [PackedWeight(w) for w in self.down_proj])


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
        self.gate = Linear(hidden, num_experts, bias=False)
        lo, hi = expert_range
        self.experts = Experts(hi - lo, hidden, intermediate, lo)
        self.top_k, self.normalize, self.comm = top_k, normalize, comm

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's experts' share of the output (before the all-reduce)."""
        weights, ids = OPS.route_experts(self.gate(x), self.top_k, self.normalize)
        e = self.experts
        # per-expert packed weights where `prepack` ran (CPU), else the stacked tensors
        packed = None if torch.is_grad_enabled() else e.packed
        gate_up, down = packed or (e.gate_up_proj, e.down_proj)
        return OPS.moe_experts(x, gate_up, down, weights, ids, e.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.routed(x))


class SharedExpertMoE(SparseMoE):
    """Qwen3.5-MoE block: the routed experts plus a shared SwiGLU expert scaled by a sigmoid
    gate per token. The shared expert's intermediate dim is split like a dense MLP's; the gate
    is a per-token scalar, so each rank scales its own share and one all-reduce sums both."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 normalize: bool, expert_range: tuple[int, int], shared_range: tuple[int, int],
                 comm: Communicator):
        super().__init__(hidden, intermediate, num_experts, top_k, normalize, expert_range, comm)
        self.shared_expert = MLP(hidden, shared_range[1] - shared_range[0], comm)
        self.shared_expert_gate = Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.partial(x)
        return self.comm.all_reduce(self.routed(x) + shared)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, attn: Attention, mlp: nn.Module):
        # the only layer kind so far: full attention (see DecoderConfig.layer_types)
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, kv, write_slots, groups) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, write_slots, groups)
        return x + self.mlp(self.post_attention_layernorm(x))
