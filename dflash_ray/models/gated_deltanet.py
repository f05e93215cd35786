"""Qwen3.5's Gated DeltaNet layer (linear attention with a causal conv window and a recurrent
state per sequence) over the worker's state store.

Per token: in_proj_qkv -> depthwise causal conv (window of `conv_kernel` inputs) + silu -> q, k,
v heads; q and k L2-normalised; decay g = -exp(A_log) * softplus(a + dt_bias), rate
beta = sigmoid(b); the gated delta rule (`ops.recurrent`) -> gated RMSNorm with z -> out_proj.
Parameter names are Hugging Face's, so checkpoints load by name.

What the layer reads and writes of its state goes through the `state` object the cache hands it
(`worker/caches.py`, `StateLayer`): `state.runs` are the forward's sequences grouped so that
runs of equal length batch (prefills start from a zero state and use the chunked rule; verify
blocks start from the committed state and use the recurrent one), `state.read(run)` returns
their window and state, and `state.write(run, ...)` hands back what the store keeps (the final
state of a prefill; for a verify block what the commit needs to keep exactly the state after
the last accepted token). With TP, this rank holds key heads [k_lo, k_hi) and the value heads
that read them; a rank beyond tp_size holds none and adds zeros to the all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import OPS
from ..ops.recurrent import l2_normalize
from ..parallel.communicator import Communicator
from .cache_spec import RecurrentStateSpec
from .hf_config import LinearAttentionConfig
from .layers import Linear


class ConvTaps(nn.Module):
    """The depthwise conv's weight [C, 1, K] under HF's name (`conv1d.weight`)."""

    def __init__(self, channels: int, taps: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, taps))


class GatedNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden: int, lin: LinearAttentionConfig, k_range: tuple[int, int],
                 eps: float, comm: Communicator):
        super().__init__()
        nk = k_range[1] - k_range[0]
        self.group = lin.num_v_heads // lin.num_k_heads  # value heads per key head
        self.nk, self.nv = nk, nk * self.group
        self.dk, self.dv = lin.k_head_dim, lin.v_head_dim
        self.conv_kernel = lin.conv_kernel
        self.conv_dim = 2 * nk * self.dk + self.nv * self.dv
        self.in_proj_qkv = Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = Linear(hidden, self.nv * self.dv, bias=False)
        self.in_proj_b = Linear(hidden, self.nv, bias=False)
        self.in_proj_a = Linear(hidden, self.nv, bias=False)
        self.conv1d = ConvTaps(self.conv_dim, lin.conv_kernel)
        self.dt_bias = nn.Parameter(torch.empty(self.nv))
        self.A_log = nn.Parameter(torch.empty(self.nv))
        self.norm = GatedNorm(self.dv)
        self.out_proj = Linear(self.nv * self.dv, hidden, bias=False)
        self.eps, self.comm = eps, comm

    def cache_spec(self) -> RecurrentStateSpec:
        return RecurrentStateSpec(self.conv_dim, self.conv_kernel, self.nv, self.dk, self.dv)

    def _heads(self, conv: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        """conv [N, L, C] after the conv; b, a [N, L, nv] -> q, k [N, L, nv, dk] (normalised,
        repeated to the value heads, q scaled), v [N, L, nv, dv], g and beta [N, L, nv]."""
        n, length, _ = conv.shape
        kd = self.nk * self.dk
        q, k, v = conv.float().split((kd, kd, self.nv * self.dv), dim=-1)
        q = l2_normalize(q.reshape(n, length, self.nk, self.dk)) * self.dk**-0.5
        k = l2_normalize(k.reshape(n, length, self.nk, self.dk))
        if self.group > 1:
            q, k = (t.repeat_interleave(self.group, dim=2) for t in (q, k))
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return q, k, v.reshape(n, length, self.nv, self.dv), g, torch.sigmoid(b.float())

    def forward(self, x: torch.Tensor, cos, sin, state, write_slots, groups) -> torch.Tensor:
        t = x.shape[0]
        mixed = self.in_proj_qkv(x)  # [T, C]
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [T, nv]
        core = x.new_zeros(t, self.nv, self.dv)
        weight = self.conv1d.weight[:, 0]  # [C, K]
        for run in state.runs:
            window, s0 = state.read(run)  # [N, K-1, C], [N, nv, dk, dv]
            inputs = mixed[run.rows]  # [N, L, C]
            q, k, v, g, beta = self._heads(OPS.causal_conv1d(inputs, window, weight),
                                           b[run.rows], a[run.rows])
            if run.prefill:
                out, final = OPS.gated_delta_rule_chunked(q, k, v, g, beta, s0)
            else:
                out, states = OPS.gated_delta_rule_recurrent(q, k, v, g, beta, s0,
                                                             state.state_dtype)
                final = states[:, -1]
            state.write(run, window, inputs, final, (k, v, g, beta))
            core[run.rows.reshape(-1)] = out.reshape(-1, self.nv, self.dv).to(x.dtype)
        z = self.in_proj_z(x).view(t, self.nv, self.dv)
        normed = OPS.gated_rms_norm(core, z, self.norm.weight, self.eps)
        return self.comm.all_reduce(self.out_proj(normed.reshape(t, -1)))
