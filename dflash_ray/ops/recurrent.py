"""Reference ops of Gated DeltaNet layers (Qwen3.5 / Qwen3-Next linear attention): plain torch.

A DeltaNet layer keeps, per sequence, a causal-conv window (the last K-1 inputs of its depthwise
conv) and a recurrent state S [hv, dk, dv]. Per token t with decay a_t = exp(g_t) and rate b_t:

    S_t = a_t S_{t-1} + k_t u_t^T,   u_t = b_t (v_t - a_t S_{t-1}^T k_t),   o_t = S_t^T q_t

`gated_delta_rule_chunked` computes a whole prompt chunk-wise (prefill: only the final state is
kept); `gated_delta_rule_recurrent` steps token by token and returns the state after EVERY
position, which is what a verify block needs to keep exactly the state after its last accepted
token. Both take q and k already L2-normalised, q already scaled, and k/q repeated to the value
heads; everything runs in fp32 and the state is returned in fp32.

Letters: N sequences, L positions, C channels, K conv taps, hv value heads, dk/dv head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,  # [N, L, C] new inputs
    window: torch.Tensor,  # [N, K-1, C] the inputs before them (zeros for a new sequence)
    weight: torch.Tensor,  # [C, K] depthwise taps, oldest input first
) -> torch.Tensor:
    """silu(depthwise causal conv) of x given the window before it -> [N, L, C] in x's dtype.
    The window after position j is `cat(window, x)[:, j + 1 : j + K]` (the caller slices it)."""
    n, length, c = x.shape
    taps = weight.shape[1]
    full = torch.cat((window.to(weight.dtype), x.to(weight.dtype)), dim=1)  # [N, K-1+L, C]
    out = F.conv1d(full.transpose(1, 2), weight[:, None, :], groups=c)  # [N, C, L]
    assert out.shape[-1] == length and window.shape[1] == taps - 1
    return F.silu(out).transpose(1, 2).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (FLA's convention, which the checkpoints use)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_rule_recurrent(
    q: torch.Tensor,  # [N, L, hv, dk]
    k: torch.Tensor,  # [N, L, hv, dk]
    v: torch.Tensor,  # [N, L, hv, dv]
    g: torch.Tensor,  # [N, L, hv] log decay (<= 0)
    beta: torch.Tensor,  # [N, L, hv]
    state: torch.Tensor,  # [N, hv, dk, dv] before the first position
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. Returns (out [N, L, hv, dv] fp32, states [N, L, hv, dk, dv] fp32: the
    state after each position). `state_dtype`: the dtype the state is stored in between steps;
    the state is rounded to it after every position, so a block of L tokens computes exactly
    what L single-token steps would (speculation stays lossless with a bf16 state)."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    s = state.float()
    outs, states = [], []
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[..., None, None]
        predicted = (s * k[:, t, :, :, None]).sum(dim=-2)  # [N, hv, dv]
        update = (v[:, t] - predicted) * beta[:, t, :, None]
        s = s + k[:, t, :, :, None] * update[:, :, None, :]
        if state_dtype is not None and state_dtype != torch.float32:
            s = s.to(state_dtype).float()
        outs.append((s * q[:, t, :, :, None]).sum(dim=-2))
        states.append(s)
    return torch.stack(outs, dim=1), torch.stack(states, dim=1)


def gated_delta_rule_chunked(
    q: torch.Tensor,  # [N, L, hv, dk]
    k: torch.Tensor,
    v: torch.Tensor,  # [N, L, hv, dv]
    g: torch.Tensor,  # [N, L, hv]
    beta: torch.Tensor,  # [N, L, hv]
    state: torch.Tensor,  # [N, hv, dk, dv]
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence in chunks of `chunk` positions: inside a chunk the corrections u solve
    one unit-lower-triangular system, across chunks the state is carried. Returns (out
    [N, L, hv, dv] fp32, final state [N, hv, dk, dv] fp32)."""
    n, length, hv, dk = k.shape
    pad = (-length) % chunk
    # [N, hv, chunks, chunk, d]: heads first, the sequence cut into chunks; padded positions
    # have beta 0 and decay 0 in log space, so they change neither outputs nor the state
    def cut(t: torch.Tensor) -> torch.Tensor:
        t = t.float().transpose(1, 2)
        t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
        return t.reshape(n, hv, -1, chunk, *t.shape[3:])

    q, k, v, g, beta = (cut(t) for t in (q, k, v, g, beta))
    cum = g.cumsum(dim=-1)  # [N, hv, c, L'] log of the decay from the chunk start to t
    # decay between positions r <= t inside a chunk: exp(cum_t - cum_r), zero above the diagonal
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).triu(1)
    between = (cum[..., :, None] - cum[..., None, :]).masked_fill(later, float("-inf")).exp()
    # (I + A) U = rhs with A[t, r] = beta_t * decay(r -> t) * k_t.k_r for r < t
    a = ((k @ k.transpose(-1, -2)) * between * beta[..., :, None]).tril(-1)
    system = a + torch.eye(chunk, device=k.device)
    rhs_v = v * beta[..., None]
    rhs_s = k * (beta * cum.exp())[..., None]  # multiplies S_0 on the right
    u_v = torch.linalg.solve_triangular(system, rhs_v, upper=False, unitriangular=True)
    u_s = torch.linalg.solve_triangular(system, rhs_s, upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * between  # [.., t, s], s <= t
    s = state.float()
    out = torch.empty_like(v)
    for c in range(q.shape[2]):
        u = u_v[:, :, c] - u_s[:, :, c] @ s  # [N, hv, L', dv]
        out[:, :, c] = (q[:, :, c] * cum[:, :, c, :, None].exp()) @ s + qk[:, :, c] @ u
        last = cum[:, :, c, -1:]  # [N, hv, 1]
        k_to_end = k[:, :, c] * (last - cum[:, :, c]).exp()[..., None]
        s = s * last.exp()[..., None] + k_to_end.transpose(-1, -2) @ u
    out = out.reshape(n, hv, -1, v.shape[-1])[:, :, :length].transpose(1, 2)
    return out, s


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) * silu(gate) over the last dim: the norm in fp32 cast back before the
    weight, the gate in fp32 (as the checkpoints' RMSNormGated)."""
    y = weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return (y * F.silu(gate.float())).to(x.dtype)
