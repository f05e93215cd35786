"""Gated DeltaNet reference ops against naive per-token loops written from the recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dflash_ray.ops.recurrent import (
    causal_conv1d,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_rms_norm,
    l2_normalize,
)


def inputs(n=2, length=21, hv=3, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = l2_normalize(r(n, length, hv, dk)) * dk**-0.5
    k = l2_normalize(r(n, length, hv, dk))
    v = r(n, length, hv, dv)
    g = -F.softplus(r(n, length, hv))  # log decay <= 0
    beta = torch.sigmoid(r(n, length, hv))
    state = r(n, hv, dk, dv)
    return q, k, v, g, beta, state


def naive(q, k, v, g, beta, state):
    """Per sequence, head and token, with explicit matrices: S = a S + k (b (v - a S^T k))^T."""
    n, length, hv, _ = q.shape
    out = torch.zeros(n, length, hv, v.shape[-1], dtype=torch.float64)
    states = torch.zeros(n, length, *state.shape[1:], dtype=torch.float64)
    for i in range(n):
        for h in range(hv):
            s = state[i, h].double().clone()
            for t in range(length):
                a = torch.exp(g[i, t, h])
                u = beta[i, t, h] * (v[i, t, h] - a * s.T @ k[i, t, h])
                s = a * s + torch.outer(k[i, t, h], u)
                out[i, t, h] = s.T @ q[i, t, h]
                states[i, t, h] = s
    return out, states


def test_recurrent_returns_every_positions_state():
    args = inputs()
    want_out, want_states = naive(*args)
    out, states = gated_delta_rule_recurrent(*(a.float() for a in args))
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states.double(), want_states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,chunk", [(21, 8), (16, 16), (5, 64), (1, 64)])
def test_chunked_equals_the_recurrence(length, chunk):
    args = inputs(length=length)
    want_out, want_states = naive(*args)
    out, final = gated_delta_rule_chunked(*(a.float() for a in args), chunk=chunk)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), want_states[:, -1], rtol=1e-5, atol=1e-5)


def test_causal_conv1d_prefill_and_incremental_with_its_window():
    gen = torch.Generator().manual_seed(0)
    n, length, c, taps = 2, 9, 5, 4
    x = torch.randn(n, length, c, generator=gen)
    w = torch.randn(c, taps, generator=gen)
    padded = torch.cat((torch.zeros(n, taps - 1, c), x), dim=1)
    want = torch.stack([F.silu((padded[:, t : t + taps] * w.T).sum(1)) for t in range(length)], 1)
    zeros = torch.zeros(n, taps - 1, c)
    torch.testing.assert_close(causal_conv1d(x, zeros, w), want)
    # the same inputs fed 6 then 1 then 2 at a time, each with the window after the last
    window, got = zeros, []
    for lo, hi in ((0, 6), (6, 7), (7, 9)):
        got.append(causal_conv1d(x[:, lo:hi], window, w))
        window = torch.cat((window, x[:, lo:hi]), 1)[:, -(taps - 1):]
    torch.testing.assert_close(torch.cat(got, 1), want)


def test_gated_rms_norm_matches_transformers():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNormGated

    gen = torch.Generator().manual_seed(0)
    x, gate = torch.randn(7, 16, generator=gen), torch.randn(7, 16, generator=gen)
    hf = Qwen3_5MoeRMSNormGated(16, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, generator=gen))
    for dtype in (torch.float32, torch.bfloat16):
        got = gated_rms_norm(x.to(dtype), gate.to(dtype), hf.weight.to(dtype), 1e-6)
        want = hf.to(dtype)(x.to(dtype), gate.to(dtype))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
