"""RMSNorm, RoPE and the paged KV store in Triton, each with its reference's signature
(`dflash_ray.ops.reference`).

The roundings follow the references step by step so that bf16 results match them to the last
bit wherever the reference's fp32 intermediate does: RMSNorm normalises in fp32, rounds to the
input dtype, then multiplies by the weight in the promoted dtype (as `Qwen3RMSNorm`); RoPE rounds
`x*cos` and `rot*sin` to the output dtype before adding them, as torch's elementwise ops do.
There is no fused residual-add RMSNorm: the references have no such op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, eps, num_b,
    stride_xa, stride_xb, stride_wb, stride_oa, stride_ob,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0)
    a, b = row // num_b, row % num_b
    d = tl.arange(0, BLOCK_D)
    ok = d < DIM
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + d, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / DIM + eps)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        y = tl.load(w_ptr + b * stride_wb + d, mask=ok, other=0.0).to(tl.float32) * y
    tl.store(out_ptr + a * stride_oa + b * stride_ob + d, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., D] (2-D, or 3-D such as [T, heads, hd]); weight broadcastable to x's last two
    dims ([D] or [heads, D]) or None."""
    if x.ndim not in (2, 3) or x.stride(-1) != 1:
        raise ValueError(f"rms_norm kernel: x must be 2-D or 3-D with a contiguous last dim, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    x3 = x if x.ndim == 3 else x[:, None]  # [A, B, D]
    a, b, dim = x3.shape
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    o3 = out if out.ndim == 3 else out[:, None]
    if weight is None:
        w, stride_wb = x3, 0  # never read
    else:
        w = weight.expand(b, dim)
        w = w if w.stride(-1) == 1 else w.contiguous()
        stride_wb = w.stride(0)
    if a * b:
        _rms_norm_kernel[(a * b,)](
            x3, w, o3, eps, b, x3.stride(0), x3.stride(1), stride_wb, o3.stride(0), o3.stride(1),
            DIM=dim, BLOCK_D=triton.next_power_of_2(dim), HAS_WEIGHT=weight is not None,
        )
    return out


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    ok = (h < num_heads)[:, None]
    base = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    rot = tl.load(base + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=ok, other=0.0)
    cos = tl.load(cos_ptr + t * stride_ct + d).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_st + d).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    y = (x * cos[None, :]).to(out_ty).to(tl.float32) \
        + (rot.to(tl.float32) * sin[None, :]).to(out_ty).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :], y.to(out_ty), mask=ok)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd]; cos/sin_signed [T, hd] (`RotaryTable`). hd must be a power of two."""
    t, heads, hd = x.shape
    if hd & (hd - 1) or x.stride(-1) != 1 or cos.shape != (t, hd) or sin_signed.shape != (t, hd):
        raise ValueError(f"apply_rope kernel: x {tuple(x.shape)} (strides {x.stride()}), cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin_signed.shape)}: needs a power-of-two "
                         f"head dim, contiguous last dims and [T, hd] tables")
    cos, sin_signed = cos.contiguous(), sin_signed.contiguous()
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin_signed.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block_h = min(16, triton.next_power_of_2(heads))
    if t:
        _rope_kernel[(t, triton.cdiv(heads, block_h))](
            x, cos, sin_signed, out, heads, x.stride(0), x.stride(1), cos.stride(0),
            sin_signed.stride(0), out.stride(0), out.stride(1), HEAD_DIM=hd, BLOCK_H=block_h,
        )
    return out


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_kcs, stride_kch, stride_vcs, stride_vch,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h < num_heads)[:, None] & (d < HEAD_DIM)[None, :]
    slot = tl.load(slots_ptr + t)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
    tl.store(kc_ptr + slot * stride_kcs + h[:, None] * stride_kch + d[None, :],
             k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + slot * stride_vcs + h[:, None] * stride_vch + d[None, :],
             v.to(vc_ptr.dtype.element_ty), mask=ok)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Write k, v [T, nkv, hd] into slots [T] (each in [0, S), no negative indexing) of
    k_cache / v_cache [S, nkv, hd]."""
    t, heads, hd = k.shape
    if v.shape != k.shape or k_cache.shape[1:] != (heads, hd) or v_cache.shape[1:] != (heads, hd) \
            or slots.shape != (t,):
        raise ValueError(f"store_kv kernel: k {tuple(k.shape)}, v {tuple(v.shape)}, slots "
                         f"{tuple(slots.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)} do not fit")
    tensors = [x if x.stride(-1) == 1 else x.contiguous() for x in (k, v)]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kv kernel: caches need a contiguous last dim")
    k, v = tensors
    if t:
        _store_kv_kernel[(t,)](
            k, v, k_cache, v_cache, slots.contiguous(), heads, k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
            v_cache.stride(1), HEAD_DIM=hd, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_D=triton.next_power_of_2(hd),
        )
