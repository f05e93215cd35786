"""The DFlash drafter's context intake (`dflash_ray.ops.reference.context_intake`'s signature)
with each layer's k-norm, RoPE and K/V store fused into one Triton kernel after its projection.

Per drafter layer the reference runs a GEMM and then about a dozen small ops (norm in fp32,
casts, the weight, roll, two products, a sum, two scatters); here it is the GEMM and one launch,
which reads the projected row once and writes both caches. The roundings are the reference's
(see `elementwise`). The fused kernel needs the projection, the k-norm weight and the RoPE tables
in one dtype (the model's); a layer where they differ runs the reference's ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dflash_ray.ops import reference

from .elementwise import rms_norm


@triton.jit
def _norm_rope_store_kernel(
    proj_ptr, w_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slots_ptr, eps,
    stride_pt, stride_ph, stride_ct, stride_st, stride_kcs, stride_kch, stride_vcs, stride_vch,
    NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    rd = (d + HEAD_DIM // 2) % HEAD_DIM  # rotate_half's partner of each element
    ok = (h < NUM_KV)[:, None]
    ty = proj_ptr.dtype.element_ty
    k_row = proj_ptr + t * stride_pt + h[:, None] * stride_ph
    x = tl.load(k_row + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xr = tl.load(k_row + rd[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]  # [BLOCK_H, 1], one per head
    w = tl.load(w_ptr + d).to(tl.float32)[None, :]
    wr = tl.load(w_ptr + rd).to(tl.float32)[None, :]
    k = (w * (x * r).to(ty).to(tl.float32)).to(ty).to(tl.float32)  # rms_norm, as the reference
    kr = (wr * (xr * r).to(ty).to(tl.float32)).to(ty).to(tl.float32)
    cos = tl.load(cos_ptr + t * stride_ct + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + d).to(tl.float32)[None, :]
    k = (k * cos).to(ty).to(tl.float32) + (kr * sin).to(ty).to(tl.float32)  # apply_rope
    slot = tl.load(slots_ptr + t)
    tl.store(kc_ptr + slot * stride_kcs + h[:, None] * stride_kch + d[None, :],
             k.to(ty).to(kc_ptr.dtype.element_ty), mask=ok)
    v = tl.load(k_row + NUM_KV * stride_ph + d[None, :], mask=ok, other=0.0)
    tl.store(vc_ptr + slot * stride_vcs + h[:, None] * stride_vch + d[None, :],
             v.to(vc_ptr.dtype.element_ty), mask=ok)


def norm_rope_store(proj: torch.Tensor, k_norm: torch.Tensor, eps: float, cos: torch.Tensor,
                    sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """proj [T, 2*nkv, hd] (k heads then v heads) -> k normed and rotated, both stored at slots;
    hd a power of two, one dtype for proj / k_norm / cos / sin_signed."""
    t, two_nkv, hd = proj.shape
    nkv = two_nkv // 2
    if proj.stride(-1) != 1 or hd & (hd - 1) or k_cache.shape[1:] != (nkv, hd):
        raise ValueError(f"norm_rope_store: proj {tuple(proj.shape)} (strides {proj.stride()}), "
                         f"caches {tuple(k_cache.shape)}: needs a power-of-two head dim and a "
                         f"contiguous last dim")
    cos, sin_signed, k_norm = cos.contiguous(), sin_signed.contiguous(), k_norm.contiguous()
    if t:
        _norm_rope_store_kernel[(t,)](
            proj, k_norm, cos, sin_signed, k_cache, v_cache, slots.contiguous(), eps,
            proj.stride(0), proj.stride(1), cos.stride(0), sin_signed.stride(0),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            NUM_KV=nkv, HEAD_DIM=hd, BLOCK_H=triton.next_power_of_2(nkv),
        )


def context_intake(features, fc, hidden_norm, eps, layers, num_kv_heads, cos, sin_signed, kv,
                   slots) -> None:
    """`reference.context_intake`: C = hidden_norm(fc(features)), then per layer its k/v
    projection of C, k normed and rotated, written into its cache."""
    c = rms_norm(reference.linear(features, fc), hidden_norm, eps)
    for layer, (k_cache, v_cache) in zip(layers, kv, strict=True):
        proj = reference.linear(c, layer.kv_weight, layer.kv_bias).view(c.shape[0],
                                                                         2 * num_kv_heads, -1)
        if {proj.dtype, layer.k_norm.dtype, cos.dtype, sin_signed.dtype} != {proj.dtype}:
            k = reference.apply_rope(reference.rms_norm(proj[:, :num_kv_heads], layer.k_norm,
                                                        eps), cos, sin_signed)
            reference.store_kv(k_cache, v_cache, slots, k, proj[:, num_kv_heads:])
            continue
        norm_rope_store(proj, layer.k_norm, eps, cos, sin_signed, k_cache, v_cache, slots)
