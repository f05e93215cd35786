"""Paged attention in Triton with `dflash_ray.ops.reference.paged_attention`'s signature.

One launch per `AttentionGroup`. A program owns one sequence, one KV head and a tile of
(query, head) rows: the `nh // nkv` query heads that share a KV head are packed into the tile's
rows, so each gathered key and value tile serves all of them (GQA). Keys are gathered through
the group's `key_slots` (the paged cache's block table, resolved to slots), and which key a
query may see is read from the group's own mask, so every layout `build_layout` makes — the
target's verify (causal within the block over the cached context), the drafter's non-causal
block over [cached context, new context, block], prefills — runs the same kernel with the
reference's exact semantics. The mask costs Q*K bytes per sequence, small beside the K/V tiles.

Softmax is online (running max and sum in fp32). fp32 inputs use IEEE fp32 dots; bf16/fp16
inputs are widened to fp32 and multiplied as tf32, whose 10-bit mantissa holds a bf16 value
exactly, so q·k costs no precision beyond the inputs' own (Triton's interpreter cannot run a
bf16 `tl.dot`; widening keeps one code path for the interpreter and the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, rows_ptr, valid_ptr, slots_ptr, mask_ptr,
    scale, num_q, num_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_rn, stride_rq, stride_an, stride_aq, stride_sn, stride_sk,
    stride_mn, stride_mq, stride_mk,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    packed = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] (query, head) rows
    j = packed // GROUP  # query index within the sequence
    head = kv_head * GROUP + packed % GROUP
    row_ok = j < num_q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    rows = tl.load(rows_ptr + n * stride_rn + j * stride_rq, mask=row_ok, other=0)
    valid = tl.load(valid_ptr + n * stride_an + j * stride_aq, mask=row_ok, other=0) != 0
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, num_k, BLOCK_N):
        c = start + tl.arange(0, BLOCK_N)
        c_ok = c < num_k
        slots = tl.load(slots_ptr + n * stride_sn + c * stride_sk, mask=c_ok, other=0)
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                    mask=kv_ok, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        # int64: a long prefill's mask row offset j * K passes 2^31 near 46k tokens
        mask_at = (mask_ptr + n.to(tl.int64) * stride_mn + j.to(tl.int64)[:, None] * stride_mq
                   + c[None, :] * stride_mk)
        allowed = tl.load(mask_at, mask=row_ok[:, None] & c_ok[None, :], other=0) != 0
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                    mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty),
             mask=(row_ok & valid)[:, None] & d_ok[None, :])


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, groups,
                    scale: float) -> torch.Tensor:
    """q [T, nh, hd]; k_cache/v_cache [S, nkv, hd]; returns [T, nh, hd], rows no group covers
    zero (the reference's contract, `reference.paged_attention`)."""
    t, nh, hd = q.shape
    nkv = k_cache.shape[1]
    if nh % nkv or v_cache.shape[1] != nkv or k_cache.shape[2] != hd:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    out = torch.zeros_like(q)
    group_size = nh // nkv
    block_d = max(16, triton.next_power_of_2(hd))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for g in groups:
        n, width = g.key_slots.shape
        num_q = g.query_rows.shape[1]
        mask = g.mask.expand(n, 1, num_q, width).view(torch.uint8)  # [N, 1, Q, K]
        valid = g.query_valid.view(torch.uint8)
        block_m = max(16, min(64, triton.next_power_of_2(num_q * group_size)))
        # fp32 tiles of the gathered K and V, two stages in flight: kept under ~110 KiB of
        # shared memory at head dim 128 (Hopper allows 227 KiB per block)
        block_n = 64 if block_d <= 64 else 32
        grid = (n, nkv, triton.cdiv(num_q * group_size, block_m))
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, out, g.query_rows, valid, g.key_slots, mask,
            scale, num_q, width,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
            g.query_rows.stride(0), g.query_rows.stride(1), valid.stride(0), valid.stride(1),
            g.key_slots.stride(0), g.key_slots.stride(1),
            mask.stride(0), mask.stride(2), mask.stride(3),
            GROUP=group_size, HEAD_DIM=hd, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            PRECISION=precision, num_warps=4 if block_d <= 64 else 8, num_stages=2,
        )
    return out
