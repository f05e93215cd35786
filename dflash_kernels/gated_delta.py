"""The gated delta rule (`dflash_ray.ops.recurrent`) on flash-linear-attention's Triton kernels
(`fla-core`, in the `gpu` extra): adapters with the reference ops' signatures.

Both reference ops take q and k already L2-normalised, q already scaled and repeated to the value
heads, in the sequence-first layout [N, L, heads, d], and a state [N, hv, dk, dv]. fla's kernels
take the same layout and the same state layout (its default `state_v_first=False`), so the
adapters pass `scale=1.0`, `use_qk_l2norm_in_kernel=False` and the sigmoid'd beta / log-space
decay as they are. A run's sequences all have the same length (`StateRun`), so the batch dim
carries them and `cu_seqlens` is not needed. Inputs are widened to fp32 first, as the reference
does (the model hands fp32 already), and outputs come back in fp32.

`gated_delta_rule_chunked` (prefill) is one call of `chunk_gated_delta_rule`.

`gated_delta_rule_recurrent` (verify, and the commit's replay) must return the state after EVERY
position, and fla's `fused_recurrent_gated_delta_rule` keeps the state in registers and writes
only the final one. So the adapter calls it once per position (T = 1, `output_final_state`),
feeding each final state back as the next initial state: L launches of a small kernel per layer
for a block of L, each reading and writing one state per sequence, where one call over the block
would read and write it once. What that buys: the per-position states, and the rounding of the
state to `state_dtype` between positions, which is what makes a block compute exactly what L
single-token steps compute. One difference from the reference: fla forms position t's output
from the state before that rounding (the reference from the rounded state), so with a bf16 state
the outputs differ from the reference's by bf16 rounding of the state (<= 2^-9 relative), while a
block and its single steps through this adapter still agree exactly. With an fp32 state they
agree with the reference to float rounding.

fla is imported at the first call; through the registry only CUDA tensors reach these
(`dflash_kernels._device_dispatch`).
"""

from __future__ import annotations

import torch

# chunk sizes fla's chunked kernel accepts; the result does not depend on the chunk size
# (beyond float rounding), so any other size asked for runs at fla's default
FLA_CHUNKS = (16, 32, 64)


def gated_delta_rule_chunked(
    q: torch.Tensor,  # [N, L, hv, dk]
    k: torch.Tensor,  # [N, L, hv, dk]
    v: torch.Tensor,  # [N, L, hv, dv]
    g: torch.Tensor,  # [N, L, hv]
    beta: torch.Tensor,  # [N, L, hv]
    state: torch.Tensor,  # [N, hv, dk, dv]
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, L, hv, dv] fp32, final state [N, hv, dk, dv] fp32), as the reference."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    assert q.shape == k.shape and q.shape[:3] == v.shape[:3] and g.shape == q.shape[:3]
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    out, final = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=1.0, initial_state=state.float(), output_final_state=True,
        chunk_size=chunk if chunk in FLA_CHUNKS else 64)
    return out.float(), final


def gated_delta_rule_recurrent(
    q: torch.Tensor,  # [N, L, hv, dk]
    k: torch.Tensor,  # [N, L, hv, dk]
    v: torch.Tensor,  # [N, L, hv, dv]
    g: torch.Tensor,  # [N, L, hv]
    beta: torch.Tensor,  # [N, L, hv]
    state: torch.Tensor,  # [N, hv, dk, dv]
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, L, hv, dv] fp32, states [N, L, hv, dk, dv] fp32: the state after each
    position), one fla launch per position (see the module docstring)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    n, length, hv, dk = q.shape
    dv = v.shape[-1]
    assert k.shape == q.shape and v.shape[:3] == q.shape[:3] and g.shape == q.shape[:3]
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    rounding = state_dtype is not None and state_dtype != torch.float32
    s = state.float()
    out = q.new_empty(n, length, hv, dv)
    states = q.new_empty(n, length, hv, dk, dv)
    for t in range(length):
        step = slice(t, t + 1)
        o, s = fused_recurrent_gated_delta_rule(
            q[:, step], k[:, step], v[:, step], g=g[:, step], beta=beta[:, step], scale=1.0,
            initial_state=s, output_final_state=True)
        if rounding:
            s = s.to(state_dtype).float()
        out[:, t] = o[:, 0]
        states[:, t] = s
    return out, states
