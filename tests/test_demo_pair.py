"""The trained pair that ships in the package: loads with our loader and transformers, stays
lossless, and its drafter is really accepted on held-out prompts."""

from __future__ import annotations

import pytest
import torch

from dflash_ray import LLM, SamplingParams, demo_pair
from dflash_ray.benchmark.prompts import bench_prompts
from dflash_ray.config import spec_defaults


@pytest.fixture(scope="module")
def pair():
    return demo_pair()


def test_target_loads_with_transformers_and_matches_our_logits(pair):
    from transformers import AutoModelForCausalLM

    from .test_models import Harness, rel_err

    target, _ = pair
    ref = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = bench_prompts(target, 1, prompt_tokens=40)[0]
    got, _ = Harness(target).forward({0: ids})
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert rel_err(got[0], want) < 1e-5


def test_default_settings_are_lossless_and_drafts_are_accepted(pair):
    """What `LLM(target, drafter)` does without flags (the device's measured defaults; on CPU
    cut blocks, a cooldown, plain decoding above 2 running) equals plain decoding, with six
    requests at once (plain steps) and with two (speculative steps)."""
    target, drafter = pair
    prompts = bench_prompts(target, 6)
    params = SamplingParams(max_tokens=64)
    llm = LLM(target, drafter)
    config = llm.engine.config
    want = spec_defaults(config.device, "device")
    assert {k: getattr(config, k) for k in want} == want
    spec = llm.generate(prompts, params, use_tqdm=False)
    pair_spec = llm.generate(prompts[:2], params, use_tqdm=False)
    plain = LLM(target).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert [o.token_ids for o in pair_spec] == [o.token_ids for o in plain[:2]]
    taus = [t for o in pair_spec for t in o.acceptance_lengths]
    # A broken or untrained drafter gives tau = 1.0; the shipped one is well above 2 here.
    assert taus and sum(taus) / len(taus) > 2.0, taus
    assert spec[0].text and spec[0].text == plain[0].text


def test_packed_cpu_weights_change_nothing_observable(pair, monkeypatch):
    """On CPU the workers put linear weights in a CPU GEMM format (`ops.PackedWeight`): the
    shipped pair's bf16 checkpoint, loaded in fp32, has its experts and projections kept in
    bf16 and widened, its LM head in oneDNN's layout. The reference path (`DFLASH_OPS=ref`)
    must decode the same tokens and accept the same drafts. In fp32: a bf16 drafter's drafts
    may differ between the GEMM paths by rounding (its output is the target's either way,
    tested elsewhere)."""
    from dflash_ray.ops import can_pack

    if not can_pack(torch.ones(1)):
        pytest.skip("no oneDNN CPU path (or DFLASH_OPS=ref)")
    target, drafter = pair
    prompts = bench_prompts(target, 3)
    params = SamplingParams(max_tokens=48)
    packed = LLM(target, drafter, spec_min_confidence=0.1, drafter_dtype="float32")
    executor = packed.engine.executor
    assert executor.target.model.lm_head.packed is not None
    layer = executor.target.model.layers[0]
    assert all(w.widened for w in layer.mlp.experts.packed[0] + layer.mlp.experts.packed[1])
    assert layer.self_attn.qkv_proj.packed.widened
    assert not executor.target.model.lm_head.packed.widened  # larger than WIDEN_MAX_ELEMENTS
    assert executor.drafter.drafter.layers[0].self_attn.kv_packed is not None
    got = packed.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("DFLASH_OPS", "ref")
    ref = LLM(target, drafter, spec_min_confidence=0.1, drafter_dtype="float32")
    assert ref.engine.executor.target.model.lm_head.packed is None
    want = ref.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in want]
