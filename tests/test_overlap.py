"""The overlapped engine (`overlap`): the same output as the plain step, blocks all back."""

from __future__ import annotations

import pytest

from dflash_ray import LLM, SamplingParams, demo_pair

from .conftest import WHOLE
from .test_spec_decode import PROMPTS, check_marginals, exact_marginals, run_staggered

PROMPTS_TEXT = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(", "x = [",
                "def main():\n    "]


@pytest.fixture(scope="module")
def demo_llms():
    target, drafter = demo_pair()
    return {(d, o): LLM(target, drafter if d else None, overlap=o)
            for d in (False, True) for o in (False, True)}


def outs_of(engine, params):
    return [(o.token_ids, o.text, o.finish_reason)
            for o in run_staggered(engine, PROMPTS_TEXT, params)]


@pytest.mark.parametrize("drafter", [False, True])
def test_greedy_staggered_with_stop_strings_and_max_tokens_equals_plain_step(demo_llms, drafter):
    """Stop strings and max_tokens land inside accepted blocks: the riders' extra step is
    discarded, and every block comes back."""
    params = SamplingParams(max_tokens=37, temperature=0.0, stop=["return", "):"])
    want = outs_of(demo_llms[(drafter, False)].engine, params)
    engine = demo_llms[(drafter, True)].engine
    assert outs_of(engine, params) == want
    assert {r for _, _, r in want} >= {"stop", "length"}
    engine._flush_released()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_gives_the_plain_steps_text(demo_llms):
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=11 + i, stop=["\n\n"])
              for i in range(len(PROMPTS_TEXT))]
    want = demo_llms[(True, False)].generate(PROMPTS_TEXT, params, use_tqdm=False)
    got = demo_llms[(True, True)].generate(PROMPTS_TEXT, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_preemption_and_abort_free_every_block(tiny):
    kw = dict(drafter_dtype="float32", kv_block_len=4, num_kv_blocks=30,
              spec_profile="whole_block")
    params = SamplingParams(max_tokens=30)
    plain = LLM(tiny["moe"], tiny["drafter"], **kw).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(tiny["moe"], tiny["drafter"], overlap=True, **kw)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in got) > 0, "nothing was preempted"
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in PROMPTS[:4]]
    for _ in range(3):
        engine.step()
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    engine._flush_released()
    assert engine._inflight is None
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("sampling", ["coupled", "rejection"])
def test_sampled_marginals_match_the_target(tiny, sampling):
    """Overlapped steps sample from the target under both rules: the first two tokens'
    marginals over 3000 seeds match the target's exact ones (the second comes from a step
    launched before the first step's result was settled)."""
    llm = LLM(tiny["moe"], tiny["drafter"], overlap=True, drafter_dtype="float32",
              sampling=sampling, **WHOLE)
    prompt, n = [4, 8, 15, 16, 23], 3000
    params = [SamplingParams(max_tokens=3, temperature=0.7, top_k=8, top_p=0.9, seed=3000 + i)
              for i in range(n)]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    check_marginals(outs, exact_marginals(llm, prompt, 2, 0.7, 8, 0.9))
    assert sum(o.num_accepted_tokens for o in outs) > 0, "no draft was ever accepted"
    assert llm.engine.stats().counters.max_batch_size > 1
