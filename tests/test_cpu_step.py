"""The CPU fast paths (ops/fast.py) compute what the references do: each op bit-equal to its
reference on the same inputs (the same floating-point operations, fewer torch calls), and whole
engines, plain and DFlash, batched, fp32 and a bf16 drafter, give the same tokens with the
fast paths as with the references."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dflash_ray import LLM, SamplingParams
from dflash_ray.ops import REFERENCE, PackedWeight, override
from dflash_ray.ops import reference as ref
from dflash_ray.ops.fast import FAST
from dflash_ray.worker.layout import SeqSpan, build_layout

from .conftest import WHOLE


def _experts(e=8, h=16, i=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)


@pytest.mark.parametrize("tokens", [1, 2, 7])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("top_k", [2, 4])
def test_moe_experts_fast_path_is_bit_equal(tokens, packed, top_k):
    gate_up, down = _experts()
    x = torch.randn(tokens, 16)
    weights, ids = ref.route_experts(torch.randn(tokens, 8), top_k, True)
    if packed:
        gate_up, down = [PackedWeight(w) for w in gate_up], [PackedWeight(w) for w in down]
    want = ref.moe_experts(x, gate_up, down, weights, ids)
    assert torch.equal(FAST["moe_experts"](x, gate_up, down, weights, ids), want)


def test_moe_experts_fast_path_with_expert_parallelism_takes_the_reference():
    gate_up, down = _experts()
    x = torch.randn(5, 16)
    weights, ids = ref.route_experts(torch.randn(5, 8), 2, True)
    for lo, hi in ((0, 4), (4, 8)):
        want = ref.moe_experts(x, gate_up[lo:hi], down[lo:hi], weights, ids, lo)
        got = FAST["moe_experts"](x, gate_up[lo:hi], down[lo:hi], weights, ids, lo)
        assert torch.equal(got, want)


def test_silu_and_mul_fast_path_is_bit_equal():
    x = torch.randn(5, 24)
    assert torch.equal(FAST["silu_and_mul"](x), ref.silu_and_mul(x))


@pytest.mark.parametrize("q_lens,causal", [([1], True), ([1, 1, 1], True), ([5, 5], True),
                                           ([4, 4], False), ([1, 3], True), ([6, 2], False)])
def test_paged_attention_fast_path_is_bit_equal(q_lens, causal):
    """Dense groups (every sequence the same q) take the shortcut, ragged ones the reference;
    both equal the reference bit for bit."""
    block_len, nkv, nh, hd = 4, 2, 4, 8
    spans, at = [], 1
    for i, q in enumerate(q_lens):
        cached = 3 + 2 * i
        blocks = (cached + q + block_len - 1) // block_len
        spans.append(SeqSpan(list(range(at, at + blocks)), cached, q, q))
        at += blocks
    write_slots, groups = build_layout(spans, block_len, causal=causal, device="cpu")
    assert groups[0].dense == (len(set(q_lens)) == 1)
    slots = at * block_len
    k_cache, v_cache = torch.randn(slots, nkv, hd), torch.randn(slots, nkv, hd)
    q = torch.randn(sum(q_lens), nh, hd)
    want = ref.paged_attention(q, k_cache, v_cache, groups, hd**-0.5)
    assert torch.equal(FAST["paged_attention"](q, k_cache, v_cache, groups, hd**-0.5), want)


@contextlib.contextmanager
def _references():
    with contextlib.ExitStack() as stack:
        for name in FAST:
            stack.enter_context(override(name, REFERENCE[name]))
        yield


@pytest.mark.parametrize("drafter_dtype", [None, "float32", "bfloat16"])
def test_engine_tokens_and_logprobs_equal_the_references(tiny, drafter_dtype):
    """Greedy, a batch of 3 ragged prompts, with and without the drafter: the fast paths'
    tokens equal the references' (their ops are bit-equal, tested above)."""
    llm = (LLM(tiny["moe"]) if drafter_dtype is None else
           LLM(tiny["moe"], tiny["drafter"], drafter_dtype=drafter_dtype, **WHOLE))
    prompts = [[1, 2, 3, 4], [5, 6, 7], [9, 8, 7, 6, 5, 4]]
    params = SamplingParams(max_tokens=16, temperature=0.0)

    def run():
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    fast = run()
    with _references():
        reference = run()
    assert fast == reference


def test_the_registry_picks_the_fast_paths_where_no_kernel_stands_in():
    from dflash_ray.ops import OPS, forced_reference

    for name, impl in FAST.items():
        assert getattr(OPS, name) is (REFERENCE[name] if forced_reference() else impl)
