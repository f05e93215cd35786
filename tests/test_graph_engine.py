"""CUDA graphs wired into the engine (`cuda_graphs`, `worker/graph_pass.py`), on CPU with the
eager stand-in for capture (`cuda_graphs="eager"`: the same buckets, padding, scratch block and
static buffers, no capture): greedy output equals the unpadded engine's and plain decoding's
token for token, across buckets and past the largest; seeded sampling gives the same text;
which steps ride a padded graph; config errors; refused targets and failed captures fall back
loudly once, with the same output."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError

from dflash_ray import LLM, SamplingParams, demo_pair
from dflash_ray.config import EngineConfig
from dflash_ray.models.hf_config import TargetConfig
from dflash_ray.worker import graph_pass
from dflash_ray.worker.graph_pass import GraphedPass, graph_mode, key_capacities, target_refusal
from dflash_ray.worker.graphs import GraphShape
from dflash_ray.worker.layout import SeqSpan
from dflash_ray.worker.worker_config import ModelSpec, WorkerConfig

from .conftest import WHOLE

MAX_BATCH = 8  # buckets 1, 2, 4, 8
KW = dict(drafter_dtype="float32", cuda_graph_max_batch=MAX_BATCH, **WHOLE)
PROMPTS = [[(5 * i + 3 * j + 1) % 30 for j in range(2 + 3 * i)] for i in range(10)]  # 2..29


@pytest.fixture(scope="module")
def engines(tiny):
    """Plain decoding, and DFlash with graphs off and eager, on the tiny MoE target (the
    random drafter's drafts are accepted now and then on it; MoE is refused only under
    capture)."""
    return {
        "plain": LLM(tiny["moe"]),
        "off": LLM(tiny["moe"], tiny["drafter"], cuda_graphs="off", **KW),
        "eager": LLM(tiny["moe"], tiny["drafter"], cuda_graphs="eager", **KW),
        # plain decoding's q = 1 steps padded; the overlapped engine's steps padded
        "plain_eager": LLM(tiny["moe"], cuda_graphs="eager", cuda_graph_max_batch=MAX_BATCH),
        "overlap_eager": LLM(tiny["moe"], tiny["drafter"], cuda_graphs="eager", overlap=True,
                             **KW),
    }


def stats(llm) -> tuple[dict, dict]:
    """(target's, drafter's) graph counters: steps replayed, steps run eagerly, shapes."""
    ex = llm.engine.executor
    return dict(ex.target.graphs.stats), dict(ex.drafter.graphs.stats if ex.drafter else {})


def staggered(engine, prompts, params: list[SamplingParams]):
    """One request joins every step while the others decode; outputs in prompt order."""
    pending = list(enumerate(zip(prompts, params, strict=True)))
    ids, final = {}, {}
    while pending or engine.has_unfinished():
        if pending:
            i, (p, sp) = pending.pop(0)
            ids[engine.add_request(p, sp)] = i
        for out in engine.step():
            if out.finished:
                final[ids[out.request_id]] = out
    return [final[i] for i in range(len(prompts))]


@pytest.mark.parametrize("n", [1, 3, 5, 9])
def test_greedy_eager_graphs_equal_off_and_plain_across_buckets(engines, n):
    """n staggered requests (prompts of 2..26 tokens, 9..33 tokens each): the batch passes
    through buckets 1, 2, 4, 8 and, at n = 9, past the largest (eager), with the same tokens
    as the unpadded engine and as plain decoding."""
    params = [SamplingParams(max_tokens=9 + 3 * i, temperature=0.0) for i in range(n)]
    prompts = PROMPTS[:n]
    before = stats(engines["eager"])
    want = [o.token_ids for o in staggered(engines["plain"].engine, prompts, params)]
    off = staggered(engines["off"].engine, prompts, params)
    assert [o.token_ids for o in off] == want
    got = staggered(engines["eager"].engine, prompts, params)
    assert [o.token_ids for o in got] == want
    for name in ("plain_eager", "overlap_eager"):
        assert [o.token_ids for o in staggered(engines[name].engine, prompts, params)] == want
    assert stats(engines["plain_eager"])[0]["replays"] > 0  # its decode steps rode graphs
    assert [len(t) for t in want] == [p.max_tokens for p in params]
    # the padded drafter proposed the unpadded one's drafts: the same blocks were accepted
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in off]
    target, drafter = (
        {k: now[k] - was[k] for k in now} for now, was in zip(stats(engines["eager"]), before,
                                                            strict=True))
    assert target["replays"] > 0 and drafter["replays"] > 0
    assert target["eager"] >= n  # every step with a prefill (one per request joining)
    assert all(s["replays"] == s["captured"] == 0 for s in stats(engines["off"]))


def test_demo_pair_drafts_the_same_blocks_with_eager_graphs():
    """The trained demo pair, whose drafts are mostly accepted: greedy tokens and every
    step's acceptance length are the same with the padded passes as without."""
    target, drafter = demo_pair()
    prompts = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(", "x = ["]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    off = LLM(target, drafter, cuda_graphs="off", **WHOLE).generate(prompts, params,
                                                                     use_tqdm=False)
    llm = LLM(target, drafter, cuda_graphs="eager", **WHOLE)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in off]
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in off]
    lengths = [n for o in got for n in o.acceptance_lengths]
    assert sum(lengths) / len(lengths) > 1.5  # 1.9 measured: drafts were accepted
    assert all(s["replays"] > 0 for s in stats(llm))


def test_which_steps_ride_a_padded_graph(engines):
    """A prefill step runs eagerly; a decode step of 3 sequences rides bucket 4 (its pad
    writes the scratch block, past the allocator's blocks); a step that prefills a newcomer
    beside decodes runs the target eagerly while the drafter's block pass still rides; 9
    decodes (> the largest bucket) run eagerly."""
    llm = engines["eager"]
    engine, ex = llm.engine, llm.engine.executor
    assert engine.blocks.num_blocks == ex.num_kv_blocks
    blen = ex.cfg.kv_block_len
    assert ex.target.cache.kv.k.shape[1] == (ex.num_kv_blocks + 1) * blen  # + the scratch
    assert ex.drafter.cache.kv.k.shape[1] == (ex.num_kv_blocks + 1) * blen
    off = engines["off"].engine.executor
    assert off.target.cache.kv.k.shape[1] == off.num_kv_blocks * blen  # no graphs, no scratch
    scratch = slice(ex.num_kv_blocks * blen, (ex.num_kv_blocks + 1) * blen)
    ex.target.cache.kv.k[:, scratch] = 0

    def step_delta() -> tuple[dict, dict]:
        was = stats(llm)
        engine.step()
        return tuple({k: now[k] - old[k] for k in now}
                     for now, old in zip(stats(llm), was, strict=True))

    params = SamplingParams(max_tokens=40, temperature=0.0)
    for p in PROMPTS[:3]:
        engine.add_request(p, params)
    target, drafter = step_delta()  # the three prefills
    assert target == {"replays": 0, "eager": 1, "captured": 0}
    assert drafter == {"replays": 0, "eager": 0, "captured": 0}  # no block pass yet
    target, drafter = step_delta()  # three decodes: bucket 4, one pad
    assert target["replays"] == 1 and target["eager"] == 0
    assert drafter["replays"] == 1 and drafter["eager"] == 0
    assert ex.target.graphs.shape(
        [SeqSpan([0], 20, 8, 8)] * 3) == GraphShape(4, 8, 256)
    assert ex.target.cache.kv.k[:, scratch].abs().sum() > 0, "the pad wrote no scratch slot"
    engine.add_request(PROMPTS[3], params)
    target, drafter = step_delta()  # a prefill beside the decodes
    assert target["replays"] == 0 and target["eager"] == 1
    assert drafter["replays"] == 1
    while engine.has_unfinished():
        engine.step()

    for p in PROMPTS[:9]:
        engine.add_request([t % 7 for t in p[:4]], params)  # 9 prompts of <= 4 tokens
    step_delta()
    target, drafter = step_delta()  # 9 decodes, past bucket 8
    assert target == {"replays": 0, "eager": 1, "captured": 0}
    assert drafter["replays"] == 0 and drafter["eager"] == 1
    while engine.has_unfinished():
        engine.step()


def test_seeded_sampling_gives_the_same_text_with_eager_graphs(engines):
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=5 + i) for i in range(5)]
    want = engines["off"].generate(PROMPTS[:5], params, use_tqdm=False)
    got = engines["eager"].generate(PROMPTS[:5], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len({tuple(o.token_ids) for o in got}) > 1


def test_config_errors_name_the_bad_value(tiny):
    with pytest.raises(ValidationError, match="bogus"):
        EngineConfig(target=tiny["qwen3"], cuda_graphs="bogus")
    with pytest.raises(ValidationError, match="cuda_graphs='on' needs a CUDA device.*'cpu'"):
        EngineConfig(target=tiny["qwen3"], cuda_graphs="on")
    with pytest.raises(ValidationError, match="cuda_graph_max_batch"):
        EngineConfig(target=tiny["qwen3"], cuda_graph_max_batch=0)
    with pytest.raises(ValueError, match="cuda_graphs 'bogus'"):
        ModelSpec.resolve(WorkerConfig(tiny["qwen3"], cuda_graphs="bogus"))
    with pytest.raises(ValueError, match="cuda_graphs='on' needs a CUDA device"):
        graph_mode("on", torch.device("cpu"), lambda capture: None, "target")
    cfg = EngineConfig(target=tiny["qwen3"], cuda_graphs="eager", cuda_graph_max_batch=12)
    wcfg = WorkerConfig.from_engine(cfg)  # how the fields travel to every worker and actor
    assert (wcfg.cuda_graphs, wcfg.cuda_graph_max_batch) == ("eager", 12)


def test_modes_and_refusals(tiny, caplog):
    cpu = torch.device("cpu")
    assert graph_mode("auto", cpu, lambda capture: None, "t") == "off"
    assert graph_mode("off", cpu, lambda capture: None, "t") == "off"
    assert graph_mode("eager", cpu, lambda capture: None, "t") == "eager"
    dense, moe = TargetConfig.load(tiny["qwen3"]), TargetConfig.load(tiny["moe"])
    hybrid = TargetConfig.load(tiny["qwen35"])
    f32, bf16 = torch.float32, torch.bfloat16
    assert target_refusal(dense, 1, True, f32) is None
    assert "sharded over 2 ranks" in target_refusal(dense, 2, False, f32)
    assert "hybrid" in target_refusal(hybrid, 1, False, f32)
    # the registry here (no CUDA) runs the MoE with its host-side sort
    assert "MoE" in target_refusal(moe, 1, True, bf16)
    assert target_refusal(moe, 1, False, f32) is None  # eager: no capture to break
    # where the registry holds the grouped-GEMM kernel (as it builds it on a CUDA machine),
    # a bf16 MoE can be captured; other dtypes still take the host-sorting reference
    import dflash_kernels
    from dflash_ray.ops import override, reference

    with override("moe_experts",
                  dflash_kernels._device_dispatch("moe_experts", reference.moe_experts)):
        assert target_refusal(moe, 1, True, bf16) is None
        assert "float32" in target_refusal(moe, 1, True, f32)
    with caplog.at_level(logging.WARNING, logger=graph_pass.__name__):
        assert graph_mode("eager", cpu, lambda capture: "a reason", "target") == "off"
        # another rank of a sharded target: the same answer, said at info level only
        assert graph_mode("eager", cpu, lambda capture: "a reason", "target", lead=False) == "off"
    assert [r.getMessage() for r in caplog.records] == [
        "target: cuda_graphs='eager' refused, running without graphs: a reason"]


def test_key_capacity_and_bucket_choice_of_a_pass():
    assert key_capacities(512) == (256, 512)
    assert key_capacities(3000) == (256, 512, 1024, 2048, 4096)
    p = GraphedPass("t", "eager", 8, 512, layout=None, forward=None)
    assert p.shape([SeqSpan([0], 100, 4, 4)] * 3) == GraphShape(4, 4, 256)
    assert p.shape([SeqSpan([0], 300, 4, 4)]) == GraphShape(1, 4, 512)
    assert p.shape([SeqSpan([0], 600, 4, 4)]) is None  # more keys than any capacity
    assert p.shape([SeqSpan([0], 10, 4, 4)] * 9) is None  # past the largest bucket
    assert p.shape([SeqSpan([0], 10, 4, 4), SeqSpan([0], 10, 2, 2)]) is None  # ragged q
    assert GraphedPass("t", "off", 8, 512, None, None).shape([SeqSpan([0], 1, 1, 1)]) is None


def test_a_hybrid_target_is_refused_once_with_the_same_output(tiny, caplog):
    """Qwen3.5's DeltaNet state is planned per sequence: its target runs without graphs (one
    warning naming why) while the drafter's block pass still rides them."""
    params = SamplingParams(max_tokens=20, temperature=0.0)
    want = LLM(tiny["qwen35"]).generate(PROMPTS[:3], params, use_tqdm=False)
    with caplog.at_level(logging.WARNING, logger=graph_pass.__name__):
        llm = LLM(tiny["qwen35"], tiny["drafter"], cuda_graphs="eager", **KW)
        got = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "target" in refusals[0] and "hybrid" in refusals[0]
    target, drafter = stats(llm)
    assert llm.engine.executor.target.graphs.mode == "off" and target["replays"] == 0
    assert drafter["replays"] > 0


def test_a_failed_capture_warns_once_and_runs_eagerly(tiny, caplog, monkeypatch):
    def broken(fn, static, pool=None):
        raise RuntimeError("capture is not permitted here")

    monkeypatch.setattr(graph_pass, "eager_replay", broken)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    want = LLM(tiny["qwen3"]).generate(PROMPTS[:4], params, use_tqdm=False)
    with caplog.at_level(logging.WARNING, logger=graph_pass.__name__):
        llm = LLM(tiny["qwen3"], tiny["drafter"], cuda_graphs="eager", **KW)
        got = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    failed = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in failed) == ["drafter", "target"]  # once each
    ex = llm.engine.executor
    assert ex.target.graphs.mode == ex.drafter.graphs.mode == "off"
    assert stats(llm)[0]["replays"] == stats(llm)[1]["replays"] == 0
