"""The speculation policy on synthetic step costs (no models), and `spec_max_batch: auto` in a
real engine."""

from __future__ import annotations

import pytest

from dflash_ray.core.spec_policy import Adaptive, FixedLimit, make_policy


def drive(policy: Adaptive, steps: int, n: int, cost) -> list[bool]:
    """Run `steps` decode steps of batch n; cost(speculative) -> (seconds, tokens)."""
    kinds = []
    for _ in range(steps):
        kind = policy.speculate(n)
        policy.observe(n, kind, *cost(kind))
        kinds.append(kind)
    return kinds


def test_fixed_limit():
    assert make_policy(None).speculate(1000)
    p = make_policy(2)
    assert isinstance(p, FixedLimit) and p.speculate(2) and not p.speculate(3)


def test_adaptive_picks_the_cheaper_kind_per_bucket_and_probes():
    p = make_policy("auto")
    assert isinstance(p, Adaptive)
    # tau 4 everywhere. Batch 1: a speculative step costs 3 ms, a plain one 1.8 ms: speculate
    small = drive(p, 200, 1, lambda spec: (3e-3, 4) if spec else (1.8e-3, 1))
    # batch 16: 28 ms per speculative step (64 tokens) vs 6.4 ms (16 tokens): decode plain
    big = drive(p, 200, 16, lambda spec: (28e-3, 64) if spec else (6.4e-3, 16))
    # it speculates until tau rests on 64 sequence-steps, each bucket tries both kinds
    # (speculation first), then mostly runs the cheaper one
    assert small[:68] == [True] * 64 + [False] * 4
    assert big[:8] == [True] * 4 + [False] * 4
    assert small[68:].count(True) > 0.9 * 132 and big[8:].count(False) > 0.9 * 192
    # ... and keeps re-trying the other one
    assert small[68:].count(False) >= 3 and big[8:].count(True) >= 3
    s = p.summary()
    assert s["tau"] == pytest.approx(4.0)
    assert s["1"] == {"spec": pytest.approx(0.75), "plain": pytest.approx(1.8)}
    assert s["16-31"] == {"spec": pytest.approx(28 / 64), "plain": pytest.approx(0.4)}


def test_adaptive_follows_a_change_and_skips_the_first_step_of_a_switch():
    p = Adaptive(probe_every=10, probe_steps=3, window=4, tau_window=8, min_tau_samples=8)
    # batch 4, speculation pays (tau 4)
    first = drive(p, 40, 4, lambda spec: (1.0, 16) if spec else (1.0, 4))
    assert first[6:].count(True) >= 0.7 * 34  # probes: 3 steps in every 13
    # drafts stop being accepted (tau 1) and speculative steps get slower: decode plain
    later = drive(p, 60, 5, lambda spec: (2.0, 5) if spec else (1.0, 5))
    assert later[-20:].count(False) >= 15
    # a switch step that was very slow is not kept: the plain cost stays 1 s/token
    p2 = Adaptive(probe_every=1000, probe_steps=2, window=1, min_tau_samples=1)
    assert drive(p2, 2, 1, lambda spec: (1.0, 2)) == [True, True]
    assert p2.speculate(1) is False
    p2.observe(1, False, 50.0, 1)  # first plain step after speculative ones
    p2.observe(1, p2.speculate(1), 1.0, 1)
    assert p2.summary()["1"] == {"spec": pytest.approx(500.0), "plain": pytest.approx(1000.0)}


def test_adaptive_probes_less_while_the_choice_holds():
    p = Adaptive(probe_every=10, probe_steps=2, max_probe_every=80, window=4, tau_window=8,
                 min_tau_samples=4)
    kinds = drive(p, 1000, 1, lambda spec: (1.0, 4) if spec else (1.0, 1))
    probes = sum(1 for a, b in zip(kinds[4:], kinds[5:], strict=False) if a and not b)
    assert 10 <= probes <= 20  # gaps 10, 20, 40, 80, 80, ...: not 1000 / 12 = 83
    # the regime flips: the next probe (within 80 steps) finds it, and plain takes over
    later = drive(p, 200, 1, lambda spec: (1.0, 1) if spec else (0.5, 1))
    assert later.index(False) <= 82 and later[-50:].count(False) >= 40


def test_bad_probe_settings():
    with pytest.raises(ValueError, match="probe_steps must be >= 2"):
        Adaptive(probe_steps=1)
    with pytest.raises(ValueError, match="min_tau_samples=9 can never be reached"):
        Adaptive(tau_window=8, min_tau_samples=9)


def test_adaptive_speculates_until_tau_has_enough_samples():
    """Responses start with drafts that miss: a few such steps must not rule speculation out."""
    p = Adaptive(probe_every=1000, min_tau_samples=32)
    # eight speculative steps at tau 1, slower than plain, then tau 4 and cheaper per token
    costs = iter([(3.0, 1)] * 8 + [(3.0, 4)] * 100)
    kinds = drive(p, 40, 1, lambda spec: next(costs) if spec else (1.0, 1))
    assert kinds[:32] == [True] * 32 and kinds[36:].count(True) == 4


@pytest.mark.parametrize("max_num_seqs", [1, 6])
def test_auto_engine_is_lossless_and_measures_both_kinds(tiny, max_num_seqs):
    """Also with spec_reject_cooldown, where the tiny random drafter's misses make speculative
    regimes alternate q > 1 and q = 1 blocks: the policy still times them as speculative."""
    from dflash_ray.config import EngineConfig
    from dflash_ray.core.sampling_params import SamplingParams
    from dflash_ray.executors import make_engine

    params = SamplingParams(max_tokens=60, temperature=0.0)
    prompts = [[1 + i, 2, 3 + i] for i in range(6)]
    outs = {}
    auto = {"drafter": tiny["drafter"], "spec_max_batch": "auto", "spec_reject_cooldown": 1,
            "spec_profile": "whole_block"}  # whole blocks: the random drafter is never confident
    for name, kw in (("plain", {}), ("auto", auto)):
        e = make_engine(EngineConfig(target=tiny["moe"], max_num_seqs=max_num_seqs, **kw))
        rids = [e.add_request(p, params) for p in prompts]
        outs[name] = [o.token_ids for o in e.run_until_finished(rids)]
        if name == "auto":
            costs = e.scheduler.policy.summary()
            assert costs.pop("tau") >= 1.0
            bucket = "1" if max_num_seqs == 1 else "4-7"
            assert costs[bucket]["spec"] is not None and costs[bucket]["plain"] is not None
            assert e.stats().counters.num_spec_steps > 0
    assert outs["auto"] == outs["plain"]


def test_model_server_stats_report_what_auto_measured(tiny):
    """The replica's /stats body, with the engine config as YAML gives it."""
    from dflash_ray.core.sampling_params import SamplingParams
    from dflash_ray.server.model_server import ModelServer

    server = ModelServer({"target": tiny["moe"], "drafter": tiny["drafter"],
                          "spec_max_batch": "auto", "spec_profile": "whole_block"}, "tiny")
    e = server.engine
    e.run_until_finished([e.add_request([1, 2, 3 + i], SamplingParams(max_tokens=30))
                          for i in range(3)])
    stats = server.stats()
    assert stats["spec_steps"] > 0 and stats["spec_policy"]["tau"] >= 1.0
    assert stats["spec_policy"]["2-3"]["spec"] is not None
