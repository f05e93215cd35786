"""Our Qwen3.5 hybrid targets (Gated DeltaNet + gated attention, MoE with a shared expert)
against transformers' own modules on tiny random checkpoints saved by transformers (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dflash_ray.models.registry import load_target
from dflash_ray.ops import OPS, override
from dflash_ray.worker.caches import Commit, ModelCache, StateRun
from dflash_ray.worker.layout import SeqSpan, build_layout

from .conftest import VOCAB, save_qwen35, save_qwen35_dense, save_qwen35_vl

BLOCK = 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Harness:
    """Our model over its caches (paged K/V + state slots), fed step by step like the target
    worker does: a sequence's first chunk is its prefill, later chunks are verify blocks whose
    kept length `commit` decides."""

    def __init__(self, path: str, state_dtype: torch.dtype = torch.float32):
        self.model = load_target(path, torch.float32, "cpu")
        self.cache = ModelCache(self.model.cache_specs(), 64, BLOCK, torch.float32, "cpu",
                                num_slots=4, state_dtype=state_dtype)
        self.free = list(range(63, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.last: dict[int, tuple[int, int]] = {}  # seq -> (start, length) of its last block

    @torch.no_grad()
    def forward(self, chunks: dict[int, list[int]], capture=None) -> dict[int, torch.Tensor]:
        spans, ids, pos, runs = [], [], [], []
        for sid, toks in chunks.items():
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < start + len(toks):
                table.append(self.free.pop())
            spans.append(SeqSpan(table, start, len(toks), len(toks)))
            runs.append(StateRun(torch.arange(len(ids), len(ids) + len(toks))[None], [sid],
                                 start == 0))
            ids += toks
            pos += range(start, start + len(toks))
            self.lens[sid] = start + len(toks)
            self.last[sid] = (start, len(toks))
        ws, groups = build_layout(spans, BLOCK, causal=True, device="cpu")
        self.cache.plan_states(runs)
        h, self.features = self.model(torch.tensor(ids), torch.tensor(pos), self.cache, ws,
                                      groups, capture)
        logits = self.model.logits(h)
        out, i = {}, 0
        for sid, toks in chunks.items():
            out[sid] = logits[i : i + len(toks)]
            i += len(toks)
        return out

    def commit(self, kept: dict[int, int]) -> None:
        """Keep the first kept[sid] positions of each sequence's last block."""
        self.cache.commit([Commit(sid, self.last[sid][0], self.last[sid][1], n)
                           for sid, n in kept.items()])
        for sid, n in kept.items():
            self.lens[sid] = self.last[sid][0] + n


@pytest.fixture(scope="module")
def hybrids(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35")
    return {"moe": save_qwen35(root / "moe"), "dense": save_qwen35_dense(root / "dense"),
            "vl": save_qwen35_vl(root / "vl")}


@pytest.fixture(scope="module", params=["moe", "dense", "vl"])
def pair(request, hybrids):
    path = hybrids[request.param]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def hf_logits(ref, seq: list[int], last: int) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([seq])).logits[0, -last:]


def test_prefill_incremental_and_ragged_logits_match_transformers(pair):
    check_prefill_and_incremental(*pair)


def check_prefill_and_incremental(path: str, ref) -> None:
    """A ragged two-sequence prefill, then ragged single tokens and blocks, every position
    kept: the logits are transformers' over each whole sequence."""
    h = Harness(path)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, VOCAB, (13,), generator=g).tolist()
    b = torch.randint(0, VOCAB, (5,), generator=g).tolist()
    logits = h.forward({0: a, 1: b})  # ragged prefill
    full = {0: list(a), 1: list(b)}
    for sid in (0, 1):
        assert rel_err(logits[sid], hf_logits(ref, full[sid], len(full[sid]))) < 1e-5
    # incremental: single tokens and blocks, ragged, every position kept
    for chunk in ({0: [3], 1: [7, 8, 9]}, {0: [1, 2, 3, 4], 1: [5]}, {1: [6]}, {0: [2]}):
        got = h.forward(chunk)
        h.commit({sid: len(t) for sid, t in chunk.items()})
        for sid, toks in chunk.items():
            full[sid] += toks
            assert rel_err(got[sid], hf_logits(ref, full[sid], len(toks))) < 1e-5


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_verify_block_then_rollback_to_each_accepted_length(hybrids, state_dtype):
    """A 6-token verify block, then a rollback to every kept length 1..6 and a continuation:
    each DeltaNet layer's slot holds exactly (bit for bit) the state and conv window the
    verify pass computed after the last kept token, and the continuation's logits equal
    transformers' over the kept sequence."""
    path = hybrids["moe"]
    check_rollback(path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                   state_dtype)


def check_rollback(path: str, ref, state_dtype: torch.dtype) -> None:
    prompt, block, cont = [1, 5, 9, 2, 6], [4, 11, 12, 13, 14, 15], [20, 21]
    for kept in range(1, len(block) + 1):
        h = Harness(path, state_dtype)
        h.forward({0: prompt})
        seen: list[tuple] = []  # per DeltaNet layer: conv (inputs, window), then the states

        def conv(x, window, weight, _impl=OPS.causal_conv1d, _seen=seen):
            _seen.append((torch.cat((window, x), dim=1),))
            return _impl(x, window, weight)

        def rule(*args, _impl=OPS.gated_delta_rule_recurrent, _seen=seen):
            out, states = _impl(*args)
            _seen[-1] += (states,)
            return out, states

        with override("causal_conv1d", conv), override("gated_delta_rule_recurrent", rule):
            h.forward({0: block})
        h.commit({0: kept})
        for layer, (full, states) in enumerate(seen):
            assert torch.equal(h.cache.state.conv[layer, 0], full[0, kept : kept + 3])
            assert torch.equal(h.cache.state.ssm[layer, 0], states[0, kept - 1].to(state_dtype))
        got = h.forward({0: cont})
        if state_dtype == torch.float32:
            seq = prompt + block[:kept] + cont
            assert rel_err(got[0], hf_logits(ref, seq, len(cont))) < 1e-5


# z-lab's drafters for Qwen3.5-35B-A3B (reference/dflash-spec.md): the SpecForge config (8 full
# layers, 5 taps) and the released checkpoint's (5 sliding layers, window 4096, + 1 full; 8 taps)
DRAFTER_SHAPES = {
    "specforge": dict(num_hidden_layers=8, layer_ids=[1, 10, 19, 28, 37]),
    "released": dict(num_hidden_layers=6, layer_ids=[1, 6, 11, 16, 22, 27, 32, 37],
                     layer_types=["sliding_attention"] * 5 + ["full_attention"],
                     use_sliding_window=True, sliding_window=5),  # a window the test cuts
}


@pytest.mark.parametrize("shape", DRAFTER_SHAPES)
def test_zlab_35b_a3b_drafter_shape_taps_a_40_layer_hybrid(tmp_path, shape):
    """The layer pattern of Qwen3.5-35B-A3B (40 layers, full attention every 4th) at tiny
    widths, and drafters shaped like z-lab's configs for it (taps on DeltaNet and
    full-attention layers both): the taps are transformers' hidden states, and the engine
    serves each pair losslessly."""
    from dflash_ray import LLM, SamplingParams

    from .conftest import WHOLE, save_drafter

    target = save_qwen35(tmp_path / "t", num_hidden_layers=40, num_experts=4)
    ids = DRAFTER_SHAPES[shape]["layer_ids"]
    drafter = save_drafter(tmp_path / "d", **DRAFTER_SHAPES[shape])
    h = Harness(target)
    toks = [3, 1, 4, 1, 5, 9, 2, 6]
    h.forward({0: toks}, capture=ids)
    ref = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = ref(torch.tensor([toks]), output_hidden_states=True).hidden_states
    assert rel_err(h.features, torch.cat([hs[i + 1][0] for i in ids], dim=-1)) < 1e-5
    params = SamplingParams(max_tokens=24)
    spec = LLM(target, drafter, drafter_dtype="float32", **WHOLE).generate(
        [toks], params, use_tqdm=False)[0]
    plain = LLM(target).generate([toks], params, use_tqdm=False)[0]
    assert spec.token_ids == plain.token_ids


# ---- the engine on a hybrid target: greedy lossless, sampling exact, state slots ----------

PROMPTS = [[(5 * i + 3 * j) % 30 for j in range(2 + 3 * i)] for i in range(10)]  # 2..29 tokens


@pytest.fixture(scope="module")
def engines(tiny, tmp_path_factory):
    """Plain and DFlash engines on the tiny Qwen3.5-MoE, with a 2-layer drafter distilled here
    on the target's own greedy text (so blocks get accepted to every length), and the target's
    transformers model as the oracle."""
    import shutil

    from dflash_ray import LLM
    from dflash_ray.train.train_drafter import DrafterTrainArgs, train

    from .conftest import WHOLE
    from .test_engine import add_char_tokenizer

    root = tmp_path_factory.mktemp("qwen35_engine")
    target = root / "target"
    shutil.copytree(tiny["qwen35"], target)
    add_char_tokenizer(target)
    drafter = root / "drafter"
    train(DrafterTrainArgs(target=str(target), out=str(drafter), num_layers=2, block_size=8,
                           target_layer_ids=[0, 2], num_seqs=24, heldout_seqs=2,
                           prompt_tokens=(4, 12), response_tokens=48, num_anchors=12,
                           batch_seqs=8, lr=3e-3, minutes=None, steps=120, eval_every=200,
                           threads=1))
    return {
        "target": str(target),
        "drafter": str(drafter),
        "ref": AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval(),
        "plain": LLM(str(target)),
        "dflash": LLM(str(target), str(drafter), drafter_dtype="float32", **WHOLE),
    }


def test_greedy_dflash_equals_plain_equals_transformers_generate(engines):
    from dflash_ray import SamplingParams

    params = SamplingParams(max_tokens=40)
    lengths = set()
    for p in PROMPTS[:4]:
        plain = engines["plain"].generate([p], params, use_tqdm=False)[0]
        spec = engines["dflash"].generate([p], params, use_tqdm=False)[0]
        with torch.no_grad():
            hf = engines["ref"].generate(torch.tensor([p]), max_new_tokens=40, do_sample=False,
                                         min_new_tokens=40)[0, len(p):].tolist()
        assert plain.token_ids == hf
        assert spec.token_ids == plain.token_ids
        lengths |= set(spec.acceptance_lengths)
    # the distilled drafter: blocks accepted in part at more than one length, so the engine
    # rolled states back to several lengths (every length: the rollback test above)
    assert len([n for n in lengths if 1 < n < 8]) >= 2, lengths


def test_greedy_dflash_equals_plain_in_a_staggered_batch(engines):
    from dflash_ray import SamplingParams

    from .test_spec_decode import run_staggered

    params = SamplingParams(max_tokens=32)
    alone = [engines["plain"].generate([p], params, use_tqdm=False)[0] for p in PROMPTS]
    spec = run_staggered(engines["dflash"].engine, PROMPTS, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in alone]
    assert engines["dflash"].engine.stats().counters.max_batch_size >= 8
    assert sum(max(o.acceptance_lengths) > 1 for o in spec) >= 5


def test_sampled_marginals_match_the_target(engines):
    from dflash_ray import SamplingParams
    from dflash_ray.spec_decode import processed_probs

    from .test_spec_decode import check_marginals

    prompt, n = [4, 8, 15, 16, 23], 2000
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=500 + i) for i in range(n)]
    outs = engines["dflash"].generate([prompt] * n, params, use_tqdm=False)
    ref = engines["ref"]

    def probs(ids):
        with torch.no_grad():
            return processed_probs(ref(torch.tensor([ids])).logits[0, -1:], 1.0, 0, 1.0)[0]

    first = probs(prompt)
    second = sum(first[t] * probs(prompt + [t]) for t in range(VOCAB) if first[t] > 0)
    check_marginals(outs, [first, second])
    assert sum(o.num_accepted_tokens for o in outs) > 0


def test_state_pool_exhaustion_waits_and_slots_come_back(engines):
    """A budget that holds two sequences' state: ten requests wait for slots (never share
    one), each gets the text it gets alone, and every slot is free again after an abort."""
    from dflash_ray import LLM, SamplingParams

    from .conftest import WHOLE

    per_seq = engines["dflash"].engine.executor.info().state_bytes_per_seq
    llm = LLM(engines["target"], engines["drafter"], drafter_dtype="float32",
              kv_cache_gb=4.5 * per_seq / 2**30, num_kv_blocks=128, **WHOLE)
    engine = llm.engine
    assert engine.blocks.num_slots == 2
    params = SamplingParams(max_tokens=16)
    alone = [engines["plain"].generate([p], params, use_tqdm=False)[0] for p in PROMPTS]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert engine.stats().counters.max_batch_size == 2
    rid = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.blocks.num_free_slots == 1
    engine.abort(rid)
    engine.step()
    assert engine.blocks.num_free_slots == 2


def test_preemption_recomputes_the_state_and_frees_its_slot(engines):
    """Too few KV blocks for six sequences: some are preempted (their state slot freed, their
    state recomputed from zero by a fresh prefill when readmitted) and the text is unchanged."""
    from dflash_ray import LLM, SamplingParams

    from .conftest import WHOLE

    prompts = [[(3 * i + j) % 30 for j in range(5 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=60)
    want = engines["plain"].generate(prompts, params, use_tqdm=False)
    tight = LLM(engines["target"], engines["drafter"], drafter_dtype="float32", kv_block_len=4,
                num_kv_blocks=40, **WHOLE)
    got = tight.generate(prompts, params, use_tqdm=False)
    engine = tight.engine
    assert engine.stats().counters.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert engine.blocks.num_free == 40 and engine.blocks.num_free_slots == engine.blocks.num_slots
