"""The Triton kernels of `dflash_kernels` equal their references (`dflash_ray.ops.reference`) on
random ragged batches, run by Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`), and the
registry offers them only where they can run.

Tolerances, fp32: the kernels sum in another order than torch (online softmax over 32- or
64-key tiles, one dot per tile), so results differ by float rounding, ~1e-7 relative; 1e-5
leaves margin.
bf16: the kernel's inputs are the bf16 tensors, the reference runs on the same values widened to
fp32 (the exact answer for those inputs); the kernel's one rounding of its output to bf16 is a
relative error <= 2^-9, RMSNorm and RoPE round to bf16 at the same steps as the reference and may
differ from it by one bf16 ulp (2^-8 relative) where the fp32 intermediates differ in their last
bit, so 1e-2 absolute + relative (values are O(1)).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random

import pytest
import torch

import dflash_kernels
from dflash_ray import ops
from dflash_ray.ops import reference
from dflash_ray.worker.layout import SeqSpan, build_layout

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import)
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if importlib.util.find_spec("triton") is None:
    WHY_NOT = "triton is not installed (the `kernels` extra)"
elif not INTERPRET and not torch.cuda.is_available():
    WHY_NOT = "TRITON_INTERPRET is not 1 and there is no CUDA device"
else:
    WHY_NOT = None
    if INTERPRET:
        from dflash_kernels.interpret import patch_interpreter

        patch_interpreter()
    from dflash_kernels import attention, elementwise, intake
needs_triton = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BLOCK_LEN = 4


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=TOL[dtype],
                               rtol=TOL[dtype])


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16: the kernel rounds where the reference does, so nearly every element is bit-equal;
    only where the fp32 intermediates differ in their last bit can a rounding flip (one ulp).
    (fp32 results differ in the last bit often: sums in another order.)"""
    if got.dtype == torch.bfloat16:
        assert (got == want).float().mean() > 0.99, "the kernel rounds at other steps"


def ragged_spans(rng: random.Random, num_seqs: int, num_queries: int, extra_new: int,
                 num_blocks: int) -> list[SeqSpan]:
    """Sequences with odd cached lengths on scattered blocks of one shared pool."""
    pool = list(range(1, num_blocks))  # block 0 is left to padding, as the engine does
    rng.shuffle(pool)
    spans = []
    for _ in range(num_seqs):
        cached = rng.randrange(0, 23) | 1
        new = num_queries + extra_new
        need = (cached + new + BLOCK_LEN - 1) // BLOCK_LEN
        table, pool = pool[:need], pool[need:]
        spans.append(SeqSpan(table, cached, new, num_queries))
    return spans


def attention_case(spans, causal: bool, dtype: torch.dtype, nh: int, nkv: int, hd: int,
                   query_offset: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 1 + max(b for s in spans for b in s.block_table)
    slots = num_blocks * BLOCK_LEN
    _, groups = build_layout(spans, BLOCK_LEN, causal, DEVICE, query_offset=query_offset)
    t = query_offset + sum(s.num_queries for s in spans) + 1  # the last row: in no group
    q = torch.randn(t, nh, hd, generator=g)
    k_cache = torch.randn(slots, nkv, hd, generator=g)  # every slot random: stray reads show
    v_cache = torch.randn(slots, nkv, hd, generator=g)
    args = [x.to(dtype).to(DEVICE) for x in (q, k_cache, v_cache)]
    want = reference.paged_attention(*(x.float() for x in args), groups, hd**-0.5)
    got = attention.paged_attention(*args, groups, hd**-0.5)
    assert got.dtype == dtype and got.shape == want.shape
    return got, want


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_queries", [1, 16])
def test_paged_attention_target_verify(dtype, num_queries):
    """The target's decode (q = 1) and verify (q = B = 16): causal within the block, over each
    sequence's cached context on scattered blocks; GQA (4 query heads on 2 KV heads)."""
    rng = random.Random(num_queries)
    spans = ragged_spans(rng, 3, num_queries, 0, 64)
    got, want = attention_case(spans, True, dtype, 4, 2, 16, query_offset=2, seed=num_queries)
    close(got, want, dtype)
    assert not got[:2].any() and not got[-1].any(), "rows in no group must stay zero"


@needs_triton
def test_paged_attention_head_dim_128():
    """Qwen3's head dim (32-key tiles, several per sequence), 8 query heads per KV head."""
    spans = ragged_spans(random.Random(5), 2, 4, 0, 64)
    got, want = attention_case(spans, True, torch.float32, 8, 1, 128, query_offset=0, seed=5)
    close(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_drafter_block(dtype):
    """The drafter: a block of B = 8 queries, non-causal over [cached context, new context,
    block] (3 new context tokens written this step), head dim 24 (not a power of two)."""
    spans = ragged_spans(random.Random(7), 3, 8, 3, 64)
    got, want = attention_case(spans, False, dtype, 2, 1, 24, query_offset=0, seed=7)
    close(got, want, dtype)


@needs_triton
def test_paged_attention_prefill_and_decode_groups():
    """A prefill (> 32 queries, its own group) beside a decode (q = 1) and a verify (q = 16)
    that share a group, so the decode's row is padded to 16 queries: two launches, one output."""
    spans = [SeqSpan([3, 1, 5, 2, 7, 9, 11, 12, 13, 14, 15], 0, 37, 37), SeqSpan([4, 6], 5, 1, 1),
             SeqSpan([8, 10, 16, 17, 18, 19, 20], 9, 16, 16)]
    got, want = attention_case(spans, True, torch.float32, 2, 2, 16, query_offset=0, seed=3)
    close(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(1)
    x2 = torch.randn(5, 48, generator=g).to(dtype)  # [T, H], H not a power of two
    w2 = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    qkv = torch.randn(5, 7, 16, generator=g).to(dtype)  # q and k heads of a fused projection
    x3 = qkv[:, :5]  # a strided view, as the attention layer passes it
    w3 = (1 + 0.1 * torch.randn(5, 16, generator=g)).to(dtype)
    # (x2, w2.float()): a weight in another dtype, the result in the promoted one
    for x, w in ((x2, w2), (x2, None), (x3, w3), (x3, w3[0]), (x2, w2.float())):
        got = elementwise.rms_norm(x, w, 1e-6)
        want = reference.rms_norm(x, w, 1e-6)
        assert got.dtype == want.dtype and got.shape == want.shape
        close(got, want, dtype)
        same_bits(got, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope(dtype):
    g = torch.Generator().manual_seed(2)
    table = reference.RotaryTable(32, 10000.0)
    positions = torch.tensor([0, 7, 8, 9, 130])
    cos, sin = table(positions, dtype)
    x = torch.randn(5, 6, 32, generator=g).to(dtype)
    got = elementwise.apply_rope(x, cos, sin)
    want = reference.apply_rope(x, cos, sin)
    assert got.dtype == want.dtype
    close(got, want, dtype)
    same_bits(got, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(dtype):
    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(20, 2, 16, generator=g).to(dtype) for _ in range(2)]
    kv = torch.randn(5, 6, 16, generator=g).to(dtype)
    k, v = kv[:, 2:4], kv[:, 4:]  # strided views of a fused projection
    slots = torch.tensor([17, 3, 4, 11, 0])
    want = [c.clone() for c in caches]
    reference.store_kv(*want, slots, k, v)
    elementwise.store_kv(*caches, slots, k, v)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_intake(dtype):
    """The drafter's context intake over two layers (bias on one): both layers' caches as the
    reference writes them, at scattered slots; untouched slots stay as they were."""
    g = torch.Generator().manual_seed(4)
    tc, feat, hidden, nkv, hd = 5, 96, 48, 2, 16

    def rand(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=g)).to(dtype)

    features, fc, hidden_norm = rand(tc, feat), rand(hidden, feat, scale=0.1), rand(hidden)
    layers = [reference.IntakeLayer(rand(2 * nkv * hd, hidden, scale=0.2), bias,
                                    rand(hd, scale=0.1, offset=1.0))
              for bias in (None, rand(2 * nkv * hd))]
    cos, sin = reference.RotaryTable(hd, 10000.0)(torch.tensor([3, 4, 5, 9, 30]), dtype)
    slots = torch.tensor([7, 0, 12, 3, 18])
    caches = [[rand(20, nkv, hd) for _ in range(2)] for _ in layers]
    want = [[c.clone() for c in kv] for kv in caches]
    args = (features, fc, hidden_norm, 1e-6, layers, nkv, cos, sin)
    reference.context_intake(*args, want, slots)
    intake.context_intake(*args, caches, slots)
    for got_kv, want_kv in zip(caches, want, strict=True):
        for got, w in zip(got_kv, want_kv, strict=True):
            close(got, w, dtype)
            same_bits(got, w)


def test_registry_offers_kernels_only_where_they_run(monkeypatch):
    """No CUDA: no kernel, and the reason says so. CUDA present: the kernel, which still runs
    the reference for CPU tensors (and float64) without loading any Triton code."""
    dflash_kernels._unavailable.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dflash_kernels.get("rms_norm") is None
    assert dflash_kernels.reason("rms_norm") in ("no CUDA device", "triton is not installed")
    assert dflash_kernels.reason("linear") == "no kernel written for this op"
    dflash_kernels._unavailable.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dflash_kernels.importlib.util, "find_spec", lambda name: object())
    op = dflash_kernels.get("rms_norm")
    assert op is not None and dflash_kernels.get("linear") is None

    def no_kernel(name):
        raise AssertionError(f"a CPU tensor loaded {name}")

    monkeypatch.setattr(dflash_kernels.importlib, "import_module", no_kernel)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 8, dtype=dtype)
        torch.testing.assert_close(op(x, None, 1e-6), reference.rms_norm(x, None, 1e-6))
    dflash_kernels._unavailable.cache_clear()


def test_the_registry_logs_why_an_op_keeps_its_reference(caplog):
    dflash_kernels._unavailable.cache_clear()
    with caplog.at_level(logging.INFO, logger="dflash_ray.ops"):
        ops._choose("paged_attention")
        ops._choose("linear")
    why = dflash_kernels.reason("paged_attention")
    # paged_attention has a plain-torch fast path (ops/fast.py), linear only its reference
    assert f"op paged_attention: fast path ({why})" in caplog.text
    assert "op linear: reference (no kernel written for this op)" in caplog.text


# ---- MoE experts as grouped GEMMs (dflash_kernels.moe: torch's grouped GEMM, no triton) -------

MOE_CASES = [  # tokens, experts routed over, top-k, this rank's first expert, its expert count
    (1, 8, 2, 0, 8),  # a decode step
    (16, 8, 2, 0, 8),  # a verify block
    (21, 16, 4, 0, 16),
    (16, 8, 2, 3, 3),  # expert parallelism: this rank holds experts 3-5 of 8
    (7, 16, 4, 8, 8),
    (0, 8, 2, 0, 8),  # no tokens
]


def moe_inputs(tokens, experts, top_k, offset, num_local, dtype, hidden=64, width=32):
    gen = torch.Generator().manual_seed(tokens * 131 + offset)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    gate_up = (torch.randn(num_local, 2 * width, hidden, generator=gen) / 8).to(dtype)
    down = (torch.randn(num_local, hidden, width, generator=gen) / 8).to(dtype)
    weights, ids = reference.route_experts(torch.randn(tokens, experts, generator=gen).to(dtype),
                                           top_k, True)
    return x, gate_up, down, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", MOE_CASES)
def test_grouped_gemm_moe_equals_the_reference(dtype, case):
    """Routed on the device (argsort, counts, group ends) and run as two grouped GEMMs: the
    reference's pairs, rows and sums. Torch's CPU grouped GEMM multiplies each group with the
    same GEMM routine the reference's linear calls (bit-equal on the development CPU); the
    tolerance allows one rounding where another CPU's routine would differ."""
    from dflash_kernels import moe

    tokens, experts, top_k, offset, num_local = case
    x, gate_up, down, weights, ids = moe_inputs(*case, dtype)
    want = reference.moe_experts(x, gate_up, down, weights, ids, offset)
    got = moe.moe_experts(x, gate_up, down, weights, ids, offset)
    assert got.shape == want.shape == x.shape and got.dtype == dtype
    close(got, want, dtype)
    if offset:  # tokens routed only to other ranks' experts get exactly 0
        elsewhere = ~((ids >= offset) & (ids < offset + num_local)).any(dim=1)
        assert (got[elsewhere] == 0).all()
        assert elsewhere.any() or case != (16, 8, 2, 3, 3)  # that case exercises it


def test_grouped_gemm_moe_reads_nothing_back_and_falls_back_on_unaligned_widths(monkeypatch):
    """No `.tolist()` / `.item()` (what a captured graph cannot hold); widths whose rows are not
    16-byte aligned take the reference."""
    from dflash_kernels import moe

    x, gate_up, down, weights, ids = moe_inputs(16, 8, 2, 0, 8, torch.bfloat16)
    want = reference.moe_experts(x, gate_up, down, weights, ids)

    def read_back(*args, **kwargs):
        raise AssertionError("the grouped MoE read a tensor back to the host")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", read_back)
        m.setattr(torch.Tensor, "item", read_back)
        got = moe.moe_experts(x, gate_up, down, weights, ids)
    close(got, want, torch.bfloat16)
    odd = moe_inputs(5, 8, 2, 0, 8, torch.bfloat16, hidden=36, width=20)
    assert not moe.aligned(*odd[:3])
    torch.testing.assert_close(moe.moe_experts(*odd), reference.moe_experts(*odd))


def test_registry_offers_the_grouped_moe_on_capability_9_for_bf16(monkeypatch):
    """Offered where torch's bf16 grouped GEMM needs no host sync; the op it gives runs the
    reference for CPU tensors and for dtypes other than bf16."""
    dflash_kernels._torch_unavailable.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dflash_kernels.get("moe_experts") is None
    assert dflash_kernels.reason("moe_experts") == "no CUDA device"
    dflash_kernels._torch_unavailable.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert dflash_kernels.get("moe_experts") is None
    assert "compute capability 8.0" in dflash_kernels.reason("moe_experts")
    dflash_kernels._torch_unavailable.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    op = dflash_kernels.get("moe_experts")
    assert op is not None and op.kernel_dtypes == ("bfloat16",)
    assert "grouped GEMM" in op.__qualname__
    x, gate_up, down, weights, ids = moe_inputs(5, 8, 2, 0, 8, torch.float32)
    torch.testing.assert_close(op(x, gate_up, down, weights, ids),
                               reference.moe_experts(x, gate_up, down, weights, ids))
    dflash_kernels._torch_unavailable.cache_clear()


def test_an_engine_with_the_grouped_moe_gives_the_reference_engines_tokens(tiny, monkeypatch):
    """The kernel in the model's own call (stacked expert weights: no CPU packing under
    DFLASH_OPS=ref), greedy DFlash over a staggered batch: the same tokens and acceptance
    lengths as the reference MoE."""
    from dflash_kernels import moe
    from dflash_ray import LLM, SamplingParams

    from .conftest import WHOLE
    from .test_spec_decode import PROMPTS

    monkeypatch.setenv("DFLASH_OPS", "ref")
    ops.OPS.choose()
    try:
        llm = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32", **WHOLE)
        params = SamplingParams(max_tokens=24)
        want = llm.generate(PROMPTS, params, use_tqdm=False)
        calls = []

        def counted(*args):
            calls.append(isinstance(args[1], torch.Tensor) and moe.aligned(*args[:3]))
            return moe.moe_experts(*args)

        with ops.override("moe_experts", counted):
            got = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        monkeypatch.delenv("DFLASH_OPS")
        ops.OPS.choose()
    assert calls and all(calls), "the grouped GEMMs did not run (packed or unaligned weights)"
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in want]
    assert any(max(o.acceptance_lengths) > 1 for o in got)
