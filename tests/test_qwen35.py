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
    def forward(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
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
        h, _ = self.model(torch.tensor(ids), torch.tensor(pos), self.cache, ws, groups)
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
    path, ref = pair
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
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt, block, cont = [1, 5, 9, 2, 6], [4, 11, 12, 13, 14, 15], [20, 21]
    for kept in range(1, len(block) + 1):
        h = Harness(path, state_dtype)
        h.forward({0: prompt})
        seen: list[tuple] = []  # per DeltaNet layer: conv (inputs, window), then the states

        def conv(x, window, weight, _impl=OPS.causal_conv1d):
            seen.append((torch.cat((window, x), dim=1),))
            return _impl(x, window, weight)

        def rule(*args, _impl=OPS.gated_delta_rule_recurrent):
            out, states = _impl(*args)
            seen[-1] += (states,)
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
