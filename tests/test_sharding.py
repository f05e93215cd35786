"""Sharding plans (TP heads, EP experts, uneven splits) and sharded == unsharded logits.

The ranks of a sharded target run as threads of this process, each with its own gloo process
group over TCP (the same `GroupCommunicator` the Ray shard actors use): real collectives without
paying for a process start per rank.
"""

from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError

from dflash_ray.models.hf_config import TargetConfig
from dflash_ray.models.qwen3 import Qwen3Target
from dflash_ray.models.registry import load_target
from dflash_ray.models.sharding import ShardingConfig, shard_spec, split
from dflash_ray.parallel.communicator import GroupCommunicator, connect_store, open_store
from dflash_ray.worker.caches import Commit, ModelCache, StateRun
from dflash_ray.worker.layout import SeqSpan, build_layout

from .conftest import save_qwen3_moe, save_qwen3_next
from .test_models import rel_err

BLOCK = 4
# (new tokens per sequence) per forward: two prompts, then decode-sized and block-sized steps
STEPS = [
    {0: [3, 1, 4, 1, 5, 9, 2, 6, 5], 1: [2, 7, 1, 8]},
    {0: [3], 1: [5, 8, 9, 7]},
    {0: [9, 3, 2, 3, 8], 1: [4]},
]


def run_model(model: Qwen3Target, capture=(1, 3)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Feed STEPS through `model` on its own caches (paged K/V, and state slots for a hybrid's
    DeltaNet layers, every block kept whole); (logits, features) per step."""
    cache = ModelCache(model.cache_specs(), 16, BLOCK, torch.float32, "cpu", num_slots=2)
    tables = {0: [5, 2, 9, 0, 7], 1: [1, 3, 4, 6, 8]}  # out of order on purpose
    lens = {0: 0, 1: 0}
    out = []
    with torch.inference_mode():
        for chunk in STEPS:
            spans, ids, pos, runs, commits = [], [], [], [], []
            for sid, toks in chunk.items():
                spans.append(SeqSpan(tables[sid], lens[sid], len(toks), len(toks)))
                runs.append(StateRun(torch.arange(len(ids), len(ids) + len(toks))[None], [sid],
                                     lens[sid] == 0))
                if lens[sid]:
                    commits.append(Commit(sid, lens[sid], len(toks), len(toks)))
                ids += toks
                pos += range(lens[sid], lens[sid] + len(toks))
                lens[sid] += len(toks)
            slots, groups = build_layout(spans, BLOCK, causal=True, device="cpu")
            cache.plan_states(runs)
            hidden, feats = model(
                torch.tensor(ids), torch.tensor(pos), cache, slots, groups, list(capture)
            )
            cache.commit(commits)
            out.append((model.logits(hidden), feats))
    return out


def run_sharded(path: str, tp: int, world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every rank's outputs of `run_model` on its shard of a plan with attention over `tp` ranks
    and experts over all `world`, ranks as threads."""
    cfg = TargetConfig.load(path)
    store, port = open_store("127.0.0.1", timeout_s=30)
    results: list = [None] * world
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        comm = GroupCommunicator(rank, world)
        try:
            torch.set_num_threads(1)
            model = load_target(path, torch.float32, "cpu", shard_spec(cfg, rank, tp, world),
                                comm)
            comm.connect("gloo", connect_store("127.0.0.1", port, 30), "tp", timeout_s=30)
            results[rank] = run_model(model)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)
        finally:
            comm.close()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    del store
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """6 query heads over 1 KV head, 8 experts, dense MLP every other layer: on 3 ranks heads
    split 2/2/2, the KV head is replicated, experts split 3/3/2, dense MLPs 43/43/42."""
    return save_qwen3_moe(
        tmp_path_factory.mktemp("uneven") / "moe",
        num_attention_heads=6,
        num_key_value_heads=1,
        num_experts=8,
        decoder_sparse_step=2,
    )


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    """Fused DeltaNet projections (each rank reads its key heads' rows of them), dense MLPs of
    96 beside a shared expert of 48."""
    return save_qwen3_next(tmp_path_factory.mktemp("next") / "qwen3_next")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "which,tp,world",
    [("moe", 2, 2), ("qwen3", 2, 2), ("uneven", 3, 3),
     # mixed plans: attention over the first tp ranks, experts and dense MLPs over all
     ("uneven", 2, 3), ("qwen3", 1, 2),
     # a Qwen3.5 hybrid: attention and DeltaNet heads over 2 ranks, experts (2/1/1) and the
     # shared expert over 3
     ("qwen35", 2, 3),
     # Qwen3-Next: the same split; dense MLPs (32/32/32) and shared expert (16/16/16) apart
     ("qwen3_next", 2, 3)],
)
def test_sharded_logits_equal_unsharded(tiny, uneven, qwen3_next, which, tp, world):
    paths = {"uneven": uneven, "qwen3_next": qwen3_next}
    path = paths.get(which) or tiny[which]
    want = run_model(load_target(path, torch.float32, "cpu"))
    got = run_sharded(path, tp, world)
    for rank in range(world):
        for (logits, feats), (ref_logits, ref_feats) in zip(got[rank], want, strict=True):
            assert rel_err(logits, ref_logits) < 1e-5, rank
            assert rel_err(feats, ref_feats) < 1e-5, rank


def test_split_is_contiguous_and_uneven_first():
    assert [split(8, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert [split(4, 2, i) for i in range(2)] == [(0, 2), (2, 4)]
    assert [split(2, 4, i) for i in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_plan_for_tp2_ep2_and_uneven_three_ranks(tiny, uneven):
    moe = TargetConfig.load(tiny["moe"])  # 4 heads, 2 KV heads, 4 experts
    specs = [shard_spec(moe, r, 2, 2) for r in range(2)]
    assert [s.head_range for s in specs] == [(0, 2), (2, 4)]
    assert [s.kv_range for s in specs] == [(0, 1), (1, 2)]
    assert [s.expert_range for s in specs] == [(0, 2), (2, 4)]
    cfg = TargetConfig.load(uneven)
    specs = [shard_spec(cfg, r, 3, 3) for r in range(3)]
    assert [s.head_range for s in specs] == [(0, 2), (2, 4), (4, 6)]
    assert [s.kv_range for s in specs] == [(0, 1)] * 3
    assert [s.expert_range for s in specs] == [(0, 3), (3, 6), (6, 8)]
    assert [s.mlp_range for s in specs] == [(0, 43), (43, 86), (86, 128)]


def test_mixed_plan_holds_attention_on_the_first_tp_ranks_only(uneven):
    cfg = TargetConfig.load(uneven)  # 6 heads over 1 KV head, 8 experts, dense every 2nd layer
    specs = [shard_spec(cfg, r, 2, 3) for r in range(3)]
    assert [s.head_range for s in specs] == [(0, 3), (3, 6), (0, 0)]
    assert [s.kv_range for s in specs] == [(0, 1), (0, 1), (0, 0)]
    assert [s.has_attention for s in specs] == [True, True, False]
    assert [s.expert_range for s in specs] == [(0, 3), (3, 6), (6, 8)]
    assert [s.mlp_range for s in specs] == [(0, 43), (43, 86), (86, 128)]
    # the rank beyond tp_size has no attention parameters and no KV cache
    model = Qwen3Target.from_pretrained(uneven, shard=specs[2])
    assert not [n for n, _ in model.named_parameters() if ".self_attn." in n]
    assert all(c.bytes_per_token(torch.float32) == 0 for c in model.cache_specs())


def test_widest_plan_for_seven_ranks_beside_a_drafter(tiny):
    cfg = TargetConfig.load(tiny["moe"])
    # Qwen3-30B-A3B's attention: 32 query heads over 4 KV heads, 128 experts
    cfg.decoder.num_heads, cfg.decoder.num_kv_heads, cfg.num_experts = 32, 4, 128
    plan = ShardingConfig.widest(cfg, 7)
    assert (plan.tp_size, plan.ep_size) == (4, 7)
    specs = [plan.shard(cfg, r) for r in range(7)]
    assert [s.head_range for s in specs[:4]] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [s.has_attention for s in specs] == [True] * 4 + [False] * 3
    assert [s.expert_range[1] - s.expert_range[0] for s in specs] == [19, 19, 18, 18, 18, 18, 18]
    assert (ShardingConfig.widest(cfg, 8).tp_size, ShardingConfig.widest(cfg, 3).tp_size) == (8, 2)


def test_kv_heads_fewer_than_ranks_follow_their_query_heads(tiny):
    cfg = TargetConfig.load(tiny["moe"])
    cfg.decoder.num_heads, cfg.decoder.num_kv_heads = 8, 2  # 4 query heads per KV head
    specs = [shard_spec(cfg, r, 4, 4) for r in range(4)]
    # ranks 0, 1 hold query heads 0..3 (KV head 0); ranks 2, 3 hold 4..7 (KV head 1)
    assert [s.kv_range for s in specs] == [(0, 1), (0, 1), (1, 2), (1, 2)]


@pytest.mark.parametrize(
    "tp,ep,message",
    [
        (3, 3, "num_attention_heads 4 is not divisible by tp_size 3"),
        (2, 1, "tp_size 2 > ep_size 1"),
        (8, 8, "num_attention_heads 4 is not divisible by tp_size 8"),
    ],
)
def test_plan_errors_name_the_fix(tiny, tp, ep, message):
    cfg = TargetConfig.load(tiny["moe"])
    with pytest.raises(ValidationError, match=message):
        ShardingConfig.for_target(cfg, tp, ep)


def test_plan_errors_for_kv_heads_and_experts(tiny):
    cfg = TargetConfig.load(tiny["moe"])
    cfg.decoder.num_heads, cfg.decoder.num_kv_heads = 12, 4
    with pytest.raises(
        ValidationError, match=r"num_key_value_heads 4 and tp_size 6.*\[1, 2, 4, 12\]"
    ):
        ShardingConfig.for_target(cfg, 6, 6)
    cfg.decoder.num_heads, cfg.decoder.num_kv_heads = 8, 8
    with pytest.raises(ValidationError, match="ep_size 8 exceeds num_experts 4"):
        ShardingConfig.for_target(cfg, 8, 8)
