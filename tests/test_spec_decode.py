"""Losslessness: greedy DFlash equals plain greedy token for token (alone and in staggered
batches); sampled DFlash reproduces the target's distribution."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import pytest
import torch

from dflash_ray import LLM, SamplingParams
from dflash_ray.spec_decode import processed_probs, rejection_accept

from .conftest import WHOLE, save_drafter

PROMPTS = [[(7 * i + j) % 30 for j in range(1 + 3 * i)] for i in range(10)]  # lengths 1..28


def run_staggered(engine, prompts, params, join_every=2):
    """Add one request every `join_every` steps while the others decode; return outputs."""
    pending = list(enumerate(prompts))
    ids, final, step = {}, {}, 0
    while pending or engine.has_unfinished():
        if pending and step % join_every == 0:
            i, p = pending.pop(0)
            ids[engine.add_request(p, params)] = i
        for out in engine.step():
            if out.finished:
                final[ids[out.request_id]] = out
        step += 1
    return [final[i] for i in range(len(prompts))]


@pytest.mark.parametrize("mode", ["dflash", "dflash_bf16"])
def test_greedy_dflash_equals_plain_single(llms, mode):
    params = SamplingParams(max_tokens=48)
    for p in PROMPTS[:4]:
        plain = llms["plain"].generate([p], params, use_tqdm=False)[0]
        spec = llms[mode].generate([p], params, use_tqdm=False)[0]
        assert spec.token_ids == plain.token_ids
        assert len(plain.token_ids) == 48 and plain.finish_reason == "length"
        # whole blocks: every decode step verifies drafts, and the prefill gives the first
        assert spec.metrics.num_steps == len(spec.acceptance_lengths)
        assert sum(spec.acceptance_lengths) + 1 == len(spec.token_ids)


def test_drafter_runs_in_its_own_dtype_beside_the_target(llms, tiny):
    """A bf16 drafter keeps its own bf16 copy of the target's embedding and LM head; the
    target stays fp32 (both engines' outputs are checked against plain decoding elsewhere)."""
    bf16 = llms["dflash_bf16"].engine.executor
    assert bf16.drafter.dtype == torch.bfloat16
    assert bf16.drafter.head is not bf16.target.model
    assert bf16.drafter.head.lm_head.weight.dtype == torch.bfloat16
    assert bf16.target.model.lm_head.weight.dtype == torch.float32
    assert bf16.drafter.cache.kv.k.dtype == torch.bfloat16
    fp32 = llms["dflash"].engine.executor
    assert fp32.drafter.dtype == torch.float32
    assert fp32.drafter.head is fp32.target.model  # same dtype: borrowed, not copied
    with pytest.raises(ValueError, match="'int8'"):
        LLM(tiny["moe"], tiny["drafter"], drafter_dtype="int8")


def test_drafter_dtype_auto_and_bad_values(tiny, monkeypatch):
    from dflash_ray.worker.worker_config import ModelSpec, WorkerConfig, native_bf16

    def resolved(**kw):
        return WorkerConfig(tiny["moe"], tiny["drafter"], **kw).drafter_torch_dtype

    # a 16-bit target keeps its dtype for the drafter (and lends it its head)
    assert resolved(dtype="float16") == torch.float16
    assert resolved(dtype="bfloat16") == torch.bfloat16
    assert resolved(dtype="float32", drafter_dtype="float16") == torch.float16
    fp32_auto = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    assert resolved(dtype="float32") == fp32_auto
    with pytest.raises(ValueError, match="drafter_dtype 'int8'"):
        ModelSpec.resolve(WorkerConfig(tiny["moe"], tiny["drafter"], drafter_dtype="int8"))
    # DFLASH_CPU_BF16 makes this machine resolve as the other CPU class would
    monkeypatch.setenv("DFLASH_CPU_BF16", "native")
    assert resolved(dtype="float32") == torch.bfloat16
    monkeypatch.setenv("DFLASH_CPU_BF16", "emulated")
    assert resolved(dtype="float32") == torch.float32
    monkeypatch.setenv("DFLASH_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="DFLASH_CPU_BF16='yes'"):
        resolved(dtype="float32")


def test_greedy_dflash_equals_plain_staggered_batch(llms):
    params = SamplingParams(max_tokens=40)
    alone = [llms["plain"].generate([p], params, use_tqdm=False)[0] for p in PROMPTS]
    spec = run_staggered(llms["dflash"].engine, PROMPTS, params)
    spec_bf16 = run_staggered(llms["dflash_bf16"].engine, PROMPTS, params)
    plain = run_staggered(llms["plain"].engine, PROMPTS, params, join_every=3)
    assert [o.token_ids for o in spec] == [o.token_ids for o in alone]
    assert [o.token_ids for o in spec_bf16] == [o.token_ids for o in alone]
    assert [o.token_ids for o in plain] == [o.token_ids for o in alone]
    assert llms["dflash"].engine.stats().counters.max_batch_size >= 8
    assert any(max(o.acceptance_lengths) > 1 for o in spec), "no draft was ever accepted"


def test_greedy_dflash_with_a_sliding_window_drafter_equals_plain(llms, tiny, tmp_path):
    """A drafter of z-lab's Qwen3.5-MoE kind (sliding-window causal layers beside a full one;
    a window of 3, shorter than a block) in a staggered batch: still the target's own tokens."""
    drafter = save_drafter(
        tmp_path / "swa", seed=5, num_hidden_layers=3, use_sliding_window=True, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    llm = LLM(tiny["moe"], drafter, drafter_dtype="float32", **WHOLE)
    params = SamplingParams(max_tokens=40)
    alone = [llms["plain"].generate([p], params, use_tqdm=False)[0] for p in PROMPTS[:6]]
    spec = run_staggered(llm.engine, PROMPTS[:6], params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in alone]
    assert any(max(o.acceptance_lengths) > 1 for o in spec), "no draft was ever accepted"


def test_confidence_cut_blocks_stay_lossless(llms):
    """Blocks cut to the drafts the drafter is confident in: same tokens as plain, and the cut
    really happens (fewer drafts verified than the block holds, but some)."""
    params = SamplingParams(max_tokens=40)
    engine = llms["dflash_cut"].engine
    before = dataclasses.replace(engine.stats().counters.spec, accepted_per_pos=[])
    plain = llms["plain"].generate(PROMPTS, params, use_tqdm=False)
    cut = run_staggered(engine, PROMPTS, params)
    assert [o.token_ids for o in cut] == [o.token_ids for o in plain]
    s = engine.stats().counters.spec
    drafts = s.num_drafts - before.num_drafts
    proposed = s.num_draft_tokens - before.num_draft_tokens
    assert drafts > 0
    assert proposed < drafts * (engine.block_size - 1)


def test_spec_max_batch_decodes_plain_above_the_limit_and_resumes(tiny, llms):
    """Above `spec_max_batch` running sequences every block is q = 1 (no drafts), below it
    speculation resumes with the drafter's context intact: output stays equal to plain."""
    params = SamplingParams(max_tokens=40)
    # fp32 drafter: the random drafter's few accepted drafts (checked last) are those of this
    # dtype's rounding; a bf16 one accepts none of them on these prompts
    engine = LLM(tiny["moe"], tiny["drafter"], spec_max_batch=3, drafter_dtype="float32",
                 **WHOLE).engine
    seen = []  # (decodes in the step, any block with drafts)
    execute = engine.executor.execute

    def spy(batch):
        seen.append((len(batch.decodes), any(d.num_queries > 1 for d in batch.decodes)))
        return execute(batch)

    engine.executor.execute = spy
    out = run_staggered(engine, PROMPTS, params)
    plain = llms["plain"].generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert not any(spec for n, spec in seen if n > 3)
    first_big = next(i for i, (n, _) in enumerate(seen) if n > 3)
    assert any(spec for _, spec in seen[:first_big])
    assert any(spec for _, spec in seen[first_big:]), "speculation never resumed"
    assert engine.stats().counters.spec.num_accepted_tokens > 0


def test_plain_stretch_skips_the_drafter_until_context_piles_up(tiny, llms, monkeypatch):
    """With speculation off (spec_max_batch=0) the drafter sits out, but for a context-only
    pass whenever MAX_WAITING_CONTEXT rows wait for it, which takes them all in. Output stays
    plain's."""
    from dflash_ray.core import scheduler as scheduler_module

    limit = 60
    monkeypatch.setattr(scheduler_module, "MAX_WAITING_CONTEXT", limit)
    params = SamplingParams(max_tokens=150)
    engine = LLM(tiny["moe"], tiny["drafter"], spec_max_batch=0, **WHOLE).engine
    worker = engine.executor.drafter
    passes = []  # per pass: the rows each running sequence brought
    draft = worker.draft

    def spy(batch, features):
        passes.append([batch.decodes[i].context_rows for i in batch.drafter_decodes()])
        return draft(batch, features)

    worker.draft = spy
    out = run_staggered(engine, PROMPTS[:3], params)
    plain = llms["plain"].generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert engine.stats().counters.spec.num_drafts == 0
    # 3 x (prompt + 150) rows in all: several passes, each as soon as the limit is reached
    assert len(passes) >= 4
    assert all(limit <= sum(rows) < limit + 3 for rows in passes)
    assert engine.stats().counters.num_steps > 3 * len(passes)


def spy_blocks(engine) -> list[dict]:
    """Per executed step: {seq_id: (q, proposed, accepted)} of its decodes."""
    steps = []
    execute = engine.executor.execute

    def spy(batch):
        result = execute(batch)
        by_id = {r.seq_id: r for r in result.results}
        steps.append({d.seq_id: (d.num_queries, by_id[d.seq_id].num_proposed,
                                 by_id[d.seq_id].num_accepted) for d in batch.decodes})
        return result

    engine.executor.execute = spy
    return steps


def blocks_after_misses(steps, n) -> tuple[list[int], list[int]]:
    """Per sequence, after each block that rejected all its drafts: the q of its next n blocks,
    and of the block after those when that is not the request's last (the last may have one
    token left, so q = 1)."""
    timelines = defaultdict(list)
    for step in steps:
        for sid, block in step.items():
            timelines[sid].append(block)
    cooling, resumed = [], []
    for tl in timelines.values():
        for j, (_, proposed, accepted) in enumerate(tl):
            if proposed and not accepted:
                cooling += [q for q, _, _ in tl[j + 1 : j + 1 + n]]
                if j + 1 + n < len(tl) - 1:
                    resumed.append(tl[j + 1 + n][0])
    return cooling, resumed


@pytest.mark.parametrize("cooldown", [1, 2])
def test_reject_cooldown_decodes_plain_after_a_miss_and_stays_lossless(tiny, llms, cooldown):
    params = SamplingParams(max_tokens=40)
    engine = LLM(tiny["moe"], tiny["drafter"], spec_reject_cooldown=cooldown, **WHOLE).engine
    steps = spy_blocks(engine)
    out = run_staggered(engine, PROMPTS, params)
    plain = llms["plain"].generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    cooling, resumed = blocks_after_misses(steps, cooldown)
    assert cooling and set(cooling) == {1}  # the next `cooldown` blocks after a miss are plain
    assert resumed and min(resumed) > 1  # and the one after those drafts again


def exact_marginals(llm, prompt, positions, temperature, top_k, top_p):
    """P(token at position k) for k < positions, summed over every sampled prefix with the
    target's own logits: P(t2) = sum_t1 P(t1 | prompt) P(t2 | prompt, t1), and so on."""
    from tests.test_models import Harness

    target = llm.engine.executor.cfg.target

    def probs(ids):
        logits, _ = Harness(target).forward({0: ids})
        return processed_probs(logits[0][-1:], temperature, top_k, top_p)[0]

    marginals, frontier = [], [(1.0, list(prompt))]  # (probability of the prefix, prefix)
    for _ in range(positions):
        step, nxt = None, []
        for weight, ids in frontier:
            p = probs(ids)
            step = weight * p if step is None else step + weight * p
            nxt += [(weight * p[t].item(), ids + [t]) for t in torch.nonzero(p).flatten().tolist()]
        marginals.append(step)
        frontier = nxt
    return marginals


def check_marginals(outs, exact_per_position):
    n = len(outs)
    for position, exact in enumerate(exact_per_position):
        counts = torch.bincount(
            torch.tensor([o.token_ids[position] for o in outs]), minlength=exact.numel()
        ).double()
        assert counts[exact == 0].sum() == 0, "sampled a token the target gives zero mass"
        tv = 0.5 * (counts / n - exact.double()).abs().sum().item()
        # the expected TV distance of n samples from the truth is at most sqrt(V / (2 pi n)),
        # V the tokens with mass
        support = int((exact > 0).sum())
        assert tv < 2.5 * math.sqrt(support / (2 * math.pi * n)), (position, tv)


@pytest.mark.parametrize("mode", ["plain", "dflash", "dflash_bf16", "dflash_cut",
                                  "dflash_rejection"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9)])
def test_sampling_matches_target_distribution(llms, mode, temperature, top_k, top_p):
    prompt = [4, 8, 15, 16, 23]
    n = 3000
    params = [
        SamplingParams(
            max_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=1000 + i
        )
        for i in range(n)
    ]
    outs = llms[mode].generate([prompt] * n, params, use_tqdm=False)
    check_marginals(outs, exact_marginals(llms[mode], prompt, 2, temperature, top_k, top_p))
    if mode != "plain":
        assert sum(o.num_accepted_tokens for o in outs) > 0


@pytest.mark.parametrize("threshold", [0.6, 0.75])
def test_confidence_cut_keeps_rejection_sampling_exact(threshold):
    """Whether a sampled draft is verified must not depend on the value sampled: with p and q
    below and threshold 0.6, a rule using the draft's own probability q(x) would verify only
    token 0 and commit it 65 % of the time instead of p[0] = 50 %."""
    from dflash_ray.worker.draft_worker import proposal_length

    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])  # target at block positions 0, 1
    q = torch.tensor([[0.7, 0.2, 0.1]])  # drafter at position 0 (one draft)
    gen = torch.Generator().manual_seed(3)
    n = 20000
    first = torch.zeros(3)
    proposed = 0
    for _ in range(n):
        draft = torch.multinomial(q, 1, generator=gen)[:, 0]
        k, _ = proposal_length(q[0, draft], q.amax(dim=-1), 1.0, threshold)
        proposed += k
        if k:
            token = rejection_accept(draft, q, p, gen).tokens[0]
        else:
            token = int(torch.multinomial(p[:1], 1, generator=gen)[0, 0])
        first[token] += 1
    assert 0.5 * (first / n - p[0]).abs().sum() < 0.015
    assert proposed == (n if threshold <= 0.7 else 0)


def test_rejection_sampling_is_exact_against_a_close_draft():
    """Synthetic p and q: the first committed token is distributed as p[0], and the second
    (given the first was the accepted draft) as p[1]."""
    torch.manual_seed(0)
    vocab, n = 6, 20000
    p = torch.softmax(torch.randn(3, vocab), dim=-1)
    q = torch.softmax(torch.log(p[:2]) + 0.5 * torch.randn(2, vocab), dim=-1)
    gen = torch.Generator().manual_seed(1)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    accepted = 0
    for _ in range(n):
        drafts = torch.multinomial(q, 1, generator=gen)[:, 0]
        r = rejection_accept(drafts, q, p, gen)
        first[r.tokens[0]] += 1
        if r.num_accepted >= 1:
            second[r.tokens[1]] += 1
            accepted += 1
    assert 0.5 * (first / n - p[0]).abs().sum() < 0.02
    assert 0.5 * (second / second.sum() - p[1]).abs().sum() < 0.03
    assert accepted > n / 3


def test_reject_cooldown_keeps_sampling_exact(tiny):
    """The cooldown looks only at steps already done, so each verify step still samples from
    the target: the first three tokens' marginals match it (the third is where a cooldown after
    the first verify step acts)."""
    llm = LLM(tiny["moe"], tiny["drafter"], spec_reject_cooldown=1, **WHOLE)
    steps = spy_blocks(llm.engine)
    prompt, n = [4, 8, 15, 16, 23], 3000
    params = [SamplingParams(max_tokens=3, temperature=0.7, top_k=8, top_p=0.9, seed=2000 + i)
              for i in range(n)]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    check_marginals(outs, exact_marginals(llm, prompt, 3, 0.7, 8, 0.9))
    assert len(blocks_after_misses(steps, 1)[0]) > 100  # the cooldown acted on many of them


def test_rollback_of_a_rejected_block_is_one_explicit_commit(tiny):
    """After every verify the target worker commits its caches once, with per decode the
    positions verified (bonus + proposed) and kept (committed tokens): the rejected rest is
    rolled back by that call, not by a side effect."""
    engine = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32", **WHOLE).engine
    cache = engine.executor.target.cache
    commits, results = [], []
    commit, execute = cache.commit, engine.executor.execute

    def spy_commit(entries):
        commits.append(list(entries))
        commit(entries)

    def spy_execute(batch):
        result = execute(batch)
        results.append((batch, result))
        return result

    cache.commit, engine.executor.execute = spy_commit, spy_execute
    out = run_staggered(engine, PROMPTS[:4], SamplingParams(max_tokens=30))
    assert len(commits) == len(results)  # one call per step
    rejected = 0
    for entries, (batch, result) in zip(commits, results, strict=True):
        decoded = {r.seq_id: r for r in result.results}
        assert [e.start for e in entries] == [d.start for d in batch.decodes]
        for e, d in zip(entries, batch.decodes, strict=True):
            r = decoded[d.seq_id]
            assert e.slot == d.slot
            assert e.num_verified == 1 + r.num_proposed and e.num_kept == len(r.tokens)
            rejected += e.num_verified - e.num_kept
    assert rejected > 0, "no block had a rejected tail to roll back"
    plain = LLM(tiny["moe"]).generate(PROMPTS[:4], SamplingParams(max_tokens=30), use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]


COUPLED = [SamplingParams(max_tokens=40, temperature=t, top_k=k, top_p=p, seed=s)
           for t, k, p, s in [(0.8, 12, 1.0, 7), (1.0, 0, 0.9, 8), (0.6, 0, 1.0, 9)]]


def texts(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_coupled_sampling_text_is_the_same_with_speculation_on_or_off(llms):
    """With the coupled rule a seeded request's tokens are a function of its seed and the
    target: plain decoding, whole blocks, cut blocks and a bf16 drafter give the same text,
    and drafts are accepted on the way."""
    prompts = PROMPTS[:3]
    want = texts(llms["plain"].generate(prompts, COUPLED, use_tqdm=False))
    for mode in ("dflash", "dflash_cut", "dflash_bf16"):
        outs = llms[mode].generate(prompts, COUPLED, use_tqdm=False)
        assert texts(outs) == want, mode
    assert sum(o.num_accepted_tokens for o in outs) > 0


def test_coupled_sampling_text_does_not_depend_on_the_batch_or_preemption(llms, tiny):
    """The same seeded requests alone, staggered among ten others, and preempted in a KV cache
    too small for all of them give the same text."""
    prompts = PROMPTS[:3]
    alone = [texts(llms["dflash"].generate([p], [sp], use_tqdm=False))[0]
             for p, sp in zip(prompts, COUPLED, strict=True)]
    crowd = PROMPTS + prompts
    params = [SamplingParams(max_tokens=30, temperature=0.9, seed=50 + i)
              for i in range(len(PROMPTS))] + COUPLED
    ids, engine = {}, llms["dflash"].engine
    outs = {}
    for i, (p, sp) in enumerate(zip(crowd, params, strict=True)):  # joining while others run
        ids[engine.add_request(p, sp)] = i
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = out
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = out
    assert [outs[len(PROMPTS) + j].token_ids for j in range(3)] == alone
    tight = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32", kv_block_len=4,
                num_kv_blocks=30, **WHOLE)
    got = tight.generate(crowd, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in got) > 0, "nothing was preempted"
    assert texts(got[len(PROMPTS):]) == alone


def test_rejection_sampling_text_depends_on_which_steps_speculate(llms, tiny):
    """Why coupled is the default: under rejection sampling the same seeds give other text
    when drafts are verified (a plain step and a verify step draw differently), while each is
    still reproducible. Checked so that a change making the two rules one would be noticed."""
    prompts = PROMPTS[:3]
    plain = LLM(tiny["moe"], sampling="rejection")
    want = texts(plain.generate(prompts, COUPLED, use_tqdm=False))
    assert texts(plain.generate(prompts, COUPLED, use_tqdm=False)) == want
    rejection = texts(llms["dflash_rejection"].generate(prompts, COUPLED, use_tqdm=False))
    assert rejection != want
