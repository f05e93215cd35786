"""Qwen3.5 hybrid targets (dense `Qwen3_5ForCausalLM`, MoE `Qwen3_5MoeForCausalLM`, and their
`...ForConditionalGeneration` checkpoints with the language model under
`model.language_model.`; vision tower and MTP heads are skipped).

Three of every four layers (`layer_types`, or `full_attention_interval`) are Gated DeltaNet
(`gated_deltanet.py`), the others gated full attention: q_proj yields per head the query and a
sigmoid gate on the attention output, q/k RMSNorm, RoPE on the first `partial_rotary_factor` of
the head dim. Every norm but the DeltaNet's gated one is zero-centred (weight stored as w, scale
1 + w). MoE layers add a gated shared expert to the routed ones. The forward, feature taps, LM
head and sharding hooks are Qwen3Target's. Qwen3-Next is this model read from another
checkpoint layout (`qwen3_next.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import OPS, AttentionGroup, RotaryTable
from ..parallel.communicator import LOCAL, Communicator
from .cache_spec import AttentionCacheSpec, CacheSpec, RecurrentStateSpec
from .gated_deltanet import GatedDeltaNet
from .hf_config import DecoderConfig, TargetConfig
from .layers import MLP, Linear, SharedExpertMoE, SparseMoE, embedding
from .qwen3 import Qwen3Target
from .sharding import ShardSpec, full_shard


class CenteredRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), all in fp32, cast back last (Qwen3.5's norm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).to(x.dtype)


class GatedAttention(nn.Module):
    """Full attention with an output gate and partial RoPE over the paged cache."""

    def __init__(self, cfg: DecoderConfig, num_heads: int, num_kv_heads: int, rotary_dim: int,
                 output_gate: bool, comm: Communicator):
        super().__init__()
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, hd
        self.rotary_dim, self.output_gate = rotary_dim, output_gate
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, num_heads * hd * (2 if output_gate else 1), bias)
        self.k_proj = Linear(cfg.hidden_size, num_kv_heads * hd, bias)
        self.v_proj = Linear(cfg.hidden_size, num_kv_heads * hd, bias)
        self.o_proj = Linear(num_heads * hd, cfg.hidden_size, bias)
        self.q_norm = CenteredRMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = CenteredRMSNorm(hd, cfg.rms_norm_eps)
        self.scale = hd**-0.5
        self.comm = comm

    def cache_spec(self) -> AttentionCacheSpec:
        return AttentionCacheSpec(self.num_kv_heads, self.head_dim)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        return torch.cat((OPS.apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)

    def forward(self, x: torch.Tensor, cos, sin, kv, write_slots: torch.Tensor,
                groups: list[AttentionGroup]) -> torch.Tensor:
        t, nh, hd = x.shape[0], self.num_heads, self.head_dim
        qg = self.q_proj(x).view(t, nh, -1)  # per head: query [hd] then gate [hd]
        q = self._rope(self.q_norm(qg[..., :hd]), cos, sin)
        k = self._rope(self.k_norm(self.k_proj(x).view(t, self.num_kv_heads, hd)), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, hd)
        k_cache, v_cache = kv
        OPS.store_kv(k_cache, v_cache, write_slots, k, v)
        out = OPS.paged_attention(q, k_cache, v_cache, groups, self.scale).reshape(t, -1)
        if self.output_gate:
            out = out * torch.sigmoid(qg[..., hd:].reshape(t, -1))
        return self.comm.all_reduce(self.o_proj(out))


class NoMixer(nn.Module):
    """The attention or DeltaNet of a rank beyond tp_size: no weights, no cache bytes, zeros to
    the all-reduce (see `models/sharding.py`)."""

    def __init__(self, spec: CacheSpec, comm: Communicator):
        super().__init__()
        self.spec, self.comm = spec, comm

    def cache_spec(self) -> CacheSpec:
        return self.spec

    def forward(self, x: torch.Tensor, cos, sin, cache, write_slots, groups) -> torch.Tensor:
        return self.comm.all_reduce(torch.zeros_like(x))


class HybridLayer(nn.Module):
    """One decoder layer: `linear_attn` (DeltaNet) or `self_attn`, then the MLP / MoE block."""

    def __init__(self, cfg: DecoderConfig, kind: str, mixer: nn.Module, mlp: nn.Module):
        super().__init__()
        self.kind = kind
        self.input_layernorm = CenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == "linear_attention":
            self.linear_attn = mixer
        else:
            self.self_attn = mixer
        self.post_attention_layernorm = CenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.kind == "linear_attention" else self.self_attn

    def forward(self, x, cos, sin, cache, write_slots, groups) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), cos, sin, cache, write_slots, groups)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen35Target(Qwen3Target):
    def __init__(self, cfg: TargetConfig, shard: ShardSpec | None = None,
                 comm: Communicator = LOCAL):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.shard = shard or full_shard(cfg)
        d, lin = cfg.decoder, cfg.linear
        self.rotary_dim = int(d.head_dim * lin.partial_rotary_factor)
        self.embed_tokens = embedding(cfg.vocab_size, d.hidden_size)
        layers = []
        for i, kind in enumerate(d.layer_types):
            layers.append(HybridLayer(d, kind, self._mixer(kind, comm), self._mlp(i, comm)))
        self.layers = nn.ModuleList(layers)
        self.norm = CenteredRMSNorm(d.hidden_size, d.rms_norm_eps)
        self.lm_head = Linear(d.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryTable(self.rotary_dim, d.rope_theta, d.rope_scaling)

    def _mixer(self, kind: str, comm: Communicator) -> nn.Module:
        d, s, lin = self.cfg.decoder, self.shard, self.cfg.linear
        if kind == "linear_attention":
            if s.linear_range[1] > s.linear_range[0]:
                return GatedDeltaNet(d.hidden_size, lin, s.linear_range, d.rms_norm_eps, comm)
            return NoMixer(RecurrentStateSpec(0, lin.conv_kernel, 0, lin.k_head_dim,
                                              lin.v_head_dim), comm)
        if kind != "full_attention":
            raise ValueError(f"{self.cfg.architecture}: layer kind {kind!r} is not supported "
                             "(supported: full_attention, linear_attention)")
        if not s.has_attention:
            return NoMixer(AttentionCacheSpec(0, d.head_dim), comm)
        return GatedAttention(d, s.head_range[1] - s.head_range[0],
                              s.kv_range[1] - s.kv_range[0], self.rotary_dim,
                              lin.attn_output_gate, comm)

    def _mlp(self, layer: int, comm: Communicator) -> nn.Module:
        cfg, d, s = self.cfg, self.cfg.decoder, self.shard
        if not cfg.is_moe_layer(layer):
            return MLP(d.hidden_size, s.mlp_range[1] - s.mlp_range[0], comm)
        args = (d.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k,
                cfg.norm_topk_prob, s.expert_range)
        if cfg.shared_intermediate_size:
            return SharedExpertMoE(*args, s.shared_range, comm)
        return SparseMoE(*args, comm)

    def cache_specs(self) -> list[CacheSpec]:
        return [layer.mixer.cache_spec() for layer in self.layers]

    def checkpoint_name(self, key: str) -> str | None:
        if not self.shard.has_linear_attention and ".linear_attn." in key:
            return None
        return super().checkpoint_name(key)

    def checkpoint_slice(self, name: str, lazy) -> torch.Tensor:
        s, hd = self.shard, self.cfg.decoder.head_dim
        if ".self_attn.q_proj." in name:
            per_head = 2 * hd if self.cfg.linear.attn_output_gate else hd
            return lazy.slice(0, s.head_range[0] * per_head, s.head_range[1] * per_head)
        if ".linear_attn." in name:
            return self._linear_slice(name, lazy)
        if ".shared_expert." in name:  # its columns split like a dense MLP's, own width
            if ".down_proj." in name:
                return lazy.slice(1, *s.shared_range)
            return lazy.slice(0, *s.shared_range)
        return super().checkpoint_slice(name, lazy)

    def _linear_slice(self, name: str, lazy) -> torch.Tensor:
        """This rank's key heads [k_lo, k_hi) and the value heads that read them."""
        lin = self.cfg.linear
        k_lo, k_hi = self.shard.linear_range
        if (k_lo, k_hi) == (0, lin.num_k_heads):
            return lazy.read()
        group = lin.num_v_heads // lin.num_k_heads
        v_lo, v_hi = k_lo * group, k_hi * group
        dk, dv, kd = lin.k_head_dim, lin.v_head_dim, lin.num_k_heads * lin.k_head_dim
        if ".in_proj_qkv." in name or ".conv1d." in name:  # rows: q keys, k keys, values
            return torch.cat([lazy.slice(0, k_lo * dk, k_hi * dk),
                              lazy.slice(0, kd + k_lo * dk, kd + k_hi * dk),
                              lazy.slice(0, 2 * kd + v_lo * dv, 2 * kd + v_hi * dv)])
        if ".in_proj_z." in name:
            return lazy.slice(0, v_lo * dv, v_hi * dv)
        if ".in_proj_b." in name or ".in_proj_a." in name:
            return lazy.slice(0, v_lo, v_hi)
        if name.endswith((".dt_bias", ".A_log")):
            return lazy.slice(0, v_lo, v_hi)
        if ".out_proj." in name:
            return lazy.slice(1, v_lo * dv, v_hi * dv)
        return lazy.read()  # the gated norm's weight [dv]
