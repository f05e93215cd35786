"""CUDA-graph bucketing (`worker/graphs.py`) on CPU: bucket choice, which steps can be graphed,
and a real target's verify pass padded to its bucket and replayed from static buffers (the
eager stand-in for capture) equal to the same pass unpadded, with the pad rows writing only the
scratch block."""

from __future__ import annotations

import pytest
import torch

from dflash_ray.models.qwen3 import Qwen3Target
from dflash_ray.worker.caches import ModelCache
from dflash_ray.worker.graphs import (
    GraphShape,
    StepGraphs,
    attention_group,
    choose_bucket,
    eager_replay,
    graph_shape,
    make_buckets,
    padded_inputs,
)
from dflash_ray.worker.layout import SeqSpan, build_layout

BLOCK_LEN = 16
NUM_BLOCKS = 12  # allocatable blocks 0..11
SCRATCH = NUM_BLOCKS  # the extra block the cache holds for pad rows


def test_buckets_and_their_choice():
    assert make_buckets(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert make_buckets(12) == (1, 2, 4, 8, 12)
    assert make_buckets(1) == (1,)
    b = make_buckets(32)
    assert [choose_bucket(n, b) for n in (1, 2, 3, 5, 8, 9, 17, 24, 25, 32)] == \
        [1, 2, 4, 8, 8, 16, 24, 24, 32, 32]
    assert choose_bucket(33, b) is None  # past the largest: eager
    with pytest.raises(ValueError, match="got 0"):
        choose_bucket(0, b)


def test_which_steps_ride_a_graph():
    b = make_buckets(8)
    verify = [SeqSpan([1, 2], 17, 4, 4), SeqSpan([3], 5, 4, 4), SeqSpan([4], 0, 4, 4)]
    assert graph_shape(verify, b, 64) == GraphShape(4, 4, 64)
    assert graph_shape(verify, b, 20) is None  # 21 keys > capacity
    assert graph_shape(verify + [SeqSpan([5], 3, 2, 2)], b, 64) is None  # ragged q
    assert graph_shape([SeqSpan([1, 2], 0, 20, 20)], b, 64, max_q=16) is None  # a prefill
    assert graph_shape([SeqSpan([1], 0, 7, 4)], b, 64) is None  # new tokens that are not queries
    assert graph_shape(verify * 3, b, 64) is None  # 9 sequences > the largest bucket


@pytest.fixture(scope="module")
def target(tiny):
    return Qwen3Target.from_pretrained(tiny["qwen3"], dtype=torch.float32)


def prefilled(model, seqs: list[tuple[list[int], list[int]]]) -> ModelCache:
    """A cache with every sequence's prompt (tokens, block table) prefilled, plus the scratch
    block."""
    cache = ModelCache(model.cache_specs(), NUM_BLOCKS + 1, BLOCK_LEN, torch.float32, "cpu")
    spans = [SeqSpan(table, 0, len(toks), len(toks)) for toks, table in seqs]
    slots, groups = build_layout(spans, BLOCK_LEN, True, "cpu")
    ids = torch.tensor([t for toks, _ in seqs for t in toks])
    pos = torch.tensor([p for toks, _ in seqs for p in range(len(toks))])
    model(ids, pos, cache, slots, groups)
    return cache


def test_a_padded_replayed_verify_equals_the_unpadded_pass(target):
    """Three sequences (ragged contexts on scattered blocks) verify q = 4 tokens each, twice:
    eagerly, and padded to bucket 4 with keys widened to 64 through `StepGraphs`. The real rows'
    hidden states agree (fp32; the padded batch's SDPA sums over more masked columns, so the
    results differ by float rounding only: 1e-5), their greedy tokens are equal, the real
    sequences' caches are the same, and the pad rows wrote nothing but the scratch block. A
    second step through the same captured shape (inputs copied into its static buffers) agrees
    too."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32, (n,), generator=g).tolist() for n in (5, 21, 9)]
    tables = [[7], [2, 9], [4, 10]]
    eager_cache = prefilled(target, list(zip(prompts, tables, strict=True)))
    graph_cache = prefilled(target, list(zip(prompts, tables, strict=True)))
    before = graph_cache.kv.k.clone(), graph_cache.kv.v.clone()

    def forward(inputs):
        return target(inputs["input_ids"], inputs["positions"], graph_cache, inputs["write_slots"],
                      [attention_group(inputs)])[0]

    graphs = StepGraphs(forward, capture=eager_replay)
    lens = [len(p) for p in prompts]
    written: set[int] = set()
    for _ in range(2):
        spans = [SeqSpan(t, n, 4, 4) for t, n in zip(tables, lens, strict=True)]
        ids = torch.randint(0, 32, (12,), generator=g).tolist()
        pos = [p for n in lens for p in range(n, n + 4)]
        slots, groups = build_layout(spans, BLOCK_LEN, True, "cpu")
        want, _ = target(torch.tensor(ids), torch.tensor(pos), eager_cache, slots, groups)
        written |= set(slots.tolist())

        shape = graph_shape(spans, make_buckets(8), 64)
        assert shape == GraphShape(4, 4, 64)
        inputs = padded_inputs(spans, ids, pos, shape, SCRATCH, BLOCK_LEN, True, "cpu")
        got = graphs.run(shape, inputs)
        assert got.shape[0] == 16 and len(graphs) == 1
        torch.testing.assert_close(got[:12], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(target.logits(got[:12]).argmax(-1), target.logits(want).argmax(-1))
        lens = [n + 4 for n in lens]

    real = sorted(written)
    for got_c, want_c, old in zip((graph_cache.kv.k, graph_cache.kv.v),
                                  (eager_cache.kv.k, eager_cache.kv.v), before, strict=True):
        torch.testing.assert_close(got_c[:, real], want_c[:, real], atol=1e-5, rtol=1e-5)
        changed = (got_c != old).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
        scratch = range(SCRATCH * BLOCK_LEN, (SCRATCH + 1) * BLOCK_LEN)
        assert set(changed) - set(real) <= set(scratch), "a pad row wrote outside the scratch"
        assert set(changed) & set(scratch), "the pad row wrote nowhere (was it run?)"
