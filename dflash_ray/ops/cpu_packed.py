"""Linear weights in a CPU GEMM format chosen once, when a model's weights are final
(`models.layers.prepack`): fp32 weights that bf16 holds exactly are kept in bf16 and widened
before each GEMM (half the memory traffic, the same fp32 arithmetic), others are laid out in
oneDNN's blocked format. `ops.linear` applies one where it finds one. `DFLASH_OPS=ref` turns
packing off, so every GEMM then runs on the checkpoint's own layout."""

from __future__ import annotations

import os
import platform
import threading

import torch
import torch.nn.functional as F

# oneDNN keeps one primitive per GEMM shape it has run, up to this many (its default, 1024,
# ~130 KiB each), and building one costs ~0.75 ms here, 20-30x the GEMM it runs. Packed GEMMs run
# at a bounded set of row counts (`gemm_rows`), so a server's ragged batches no longer add a shape
# per token count (which filled oneDNN's default cache, ~130 MiB, bench/soak_memory.py), and 256
# entries hold the shapes a workload uses (~13 weights x the few buckets it visits) in at most
# ~33 MiB; 64 thrashed: 9-12 % of the GEMMs of a DFlash run rebuilt their primitive
# (docs/benchmarks.md).
# Read at oneDNN's first primitive, so it is set on import, before any; a value in the
# environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")


def gemm_rows(m: int) -> int:
    """The row count a packed GEMM of `m` rows runs at: `m` up to 8, then four buckets an octave
    up to 64 (10, 12, 14, 16, 20, 24, ...) and eight above (72, 80, ..., 128, 144, ...), so a
    workload's GEMMs run at a few shapes (68 up to 4096 rows) and padding adds under a quarter of
    the rows where a GEMM costs little more than its call (up to 64), under an eighth above,
    where a rebuilt primitive (~0.75 ms) would cost about what the padding of a large GEMM does."""
    if m <= 8:
        return m
    per_octave = 4 if m <= 64 else 8
    step = (1 << (m - 1).bit_length()) // (2 * per_octave)
    return -(-m // step) * step


# The largest weight (in elements; 1 MiB in fp32, within a core's L2 here) kept in bf16 and
# widened before each GEMM. Widening pays by shrinking a model's weights in memory, not per call:
# a larger weight's widened copy leaves the cache, and MKL on it ran slower than oneDNN's packed
# GEMM (a [4096, 192] LM head 218 against 93 us at 4 rows, a [1536, 2048] expert 1273 against
# 553; docs/benchmarks.md).
WIDEN_MAX_ELEMENTS = 1 << 18

_scratch = threading.local()  # per thread: shape -> the fp32 buffer a widened weight fills


class PackedWeight:
    """A linear layer's weight in the CPU GEMM format that measured fastest for it, chosen once.

    - **Widened** (fp32 weights that bf16 holds exactly, as a bf16 checkpoint loaded in fp32):
      kept in bf16 and widened to fp32 before each GEMM, into a small buffer that stays in cache.
      The arithmetic is fp32 on the very same values, so the GEMM is MKL's `F.linear` over the
      same weight, bit for bit, while memory traffic halves. That is what a step on this CPU is
      bound by: the shipped target's fp32 experts (23.6 MB) do not fit the share of L3 a core
      gets here. An expert's two GEMMs over 2 rows took 120 us in fp32 against 70 us widened
      from bf16 once 32 experts were in play, bit-equal; while the weights still fit, 43
      against 57 us (`bench/expert_cache.py`; docs/benchmarks.md, "Where a verify's time
      goes").
    - **oneDNN's blocked layout** otherwise (fp32 or bf16). Measured on this project's 2-core
      AVX-512 CPU, a [640, 192] weight among others cycling through cache: unpacked fp32 (MKL)
      took 43 / 57 / 77 us for 1 / 5 / 16 rows, packed 31 / 26 / 40 us; bf16 re-lays the
      weight out on every call unpacked (27 vs 15 us at 1 row). A whole engine's one-row fp32
      steps still ran faster unpacked, so `apply` keeps that case on the source weight.

    Holds a copy (half the fp32 weight's size widened, all of it in oneDNN's layout; the source
    is shared, not copied); `DFLASH_OPS=ref` turns packing off. Inference only: no autograd,
    stale if the source changes.
    """

    __slots__ = ("data", "source", "widened")

    def __init__(self, weight: torch.Tensor):
        self.source = weight.detach()  # the original (shared, not copied): the one-row path
        self.widened = (self.source.dtype == torch.float32
                        and self.source.numel() <= WIDEN_MAX_ELEMENTS
                        and exact_in_bf16(self.source))
        self.data = (self.source.to(torch.bfloat16) if self.widened
                     else torch.ops.mkldnn._reorder_linear_weight(self.source.contiguous()))

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear(x, source, bias)`: the same values, bit for bit where widened, up to GEMM
        rounding through oneDNN. One fp32 row (a plain decode step) keeps MKL's path on the
        source weight there: its call overhead is lower than oneDNN's (7 vs 16 us for a
        640 x 192 weight in cache; measured in a whole engine, packing every GEMM made plain
        decoding 0.82x while verify steps gained)."""
        if self.widened:
            return widened_linear(x, self.data, bias)
        if x.dtype == torch.float32 and x.numel() == x.shape[-1]:
            return F.linear(x, self.source, bias)
        rows = x.reshape(-1, x.shape[-1])
        m = rows.shape[0]
        pad = gemm_rows(m) - m  # rows are independent: the padding's zeros only cost time
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        out = torch.ops.mkldnn._linear_pointwise(rows, self.data, bias, "none", [], "")
        return out[:m].view(*x.shape[:-1], out.shape[-1])


def exact_in_bf16(weight: torch.Tensor) -> bool:
    """Whether bf16 holds every value of an fp32 `weight` exactly (no NaN among them)."""
    return bool(torch.equal(weight.to(torch.bfloat16).float(), weight))


def widened_linear(x: torch.Tensor, weight16: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight16.float(), bias)`, bit for bit, the weight widened into this
    thread's fp32 buffer of its shape (the GEMM reads it before the next widening of that shape
    can overwrite it)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(weight16.shape)
    if buf is None:
        buf = buffers[weight16.shape] = torch.empty(weight16.shape, dtype=torch.float32,
                                                    device=weight16.device)
    return F.linear(x, buf.copy_(weight16), bias)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `PackedWeight` applies: an x86 CPU (where it was measured), fp32 or bf16 (bf16
    only where oneDNN has a bf16 GEMM for this CPU), oneDNN built in, `DFLASH_OPS` not `ref`."""
    if (weight.device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64")
            or not torch.backends.mkldnn.is_available()
            or os.environ.get("DFLASH_OPS", "auto") == "ref"):
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32
