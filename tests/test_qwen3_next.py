"""Our Qwen3-Next target (Qwen3.5's hybrid model, its fused DeltaNet projections split at load)
against transformers' `Qwen3NextForCausalLM` on a tiny random checkpoint saved by transformers
(fp32). The checks are test_qwen35's, run on this checkpoint."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from dflash_ray.models.hf_config import TargetConfig
from dflash_ray.models.qwen3_next import unfuse
from dflash_ray.models.registry import load_target
from dflash_ray.models.sharding import ShardingConfig

from .conftest import WHOLE, save_drafter, save_qwen3_next
from .test_qwen35 import Harness, check_prefill_and_incremental, check_rollback, rel_err


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    return save_qwen3_next(tmp_path_factory.mktemp("qwen3_next") / "target")


@pytest.fixture(scope="module")
def ref(target):
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()


def test_config_reads_the_switches_qwen35_lacks(target):
    cfg = TargetConfig.load(target)
    assert cfg.architecture == "Qwen3NextForCausalLM" and cfg.arch == "qwen3_next"
    assert cfg.decoder.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.dense_layers == {0, 2}  # decoder_sparse_step 2
    assert cfg.decoder.intermediate_size == 96 and cfg.shared_intermediate_size == 48
    assert not cfg.norm_topk_prob
    assert cfg.linear.partial_rotary_factor == 0.25 and cfg.linear.attn_output_gate


def test_fused_projections_split_like_transformers_reorders_them(target, ref):
    """Our in_proj_qkv / z / b / a are transformers' q, k, v, z, b, a of the same input."""
    model = load_target(target, torch.float32, "cpu")
    ours, theirs = model.layers[0].linear_attn, ref.model.layers[0].linear_attn
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        q, k, v, z, b, a = theirs.fix_query_key_value_ordering(theirs.in_proj_qkvz(x),
                                                               theirs.in_proj_ba(x))
        qkv = torch.cat([t.reshape(1, 5, -1) for t in (q, k, v)], dim=-1)
        assert torch.equal(ours.in_proj_qkv(x[0]), qkv[0])
        assert torch.equal(ours.in_proj_z(x[0]), z.reshape(5, -1))
        assert torch.equal(ours.in_proj_b(x[0]), b[0])
        assert torch.equal(ours.in_proj_a(x[0]), a[0])


def test_unfuse_picks_each_heads_fields_in_order(target):
    """Rows numbered 0..n*G-1: q of head 0, q of head 1, k of head 0, ... in that order."""
    lin = TargetConfig.load(target).linear  # 2 key heads of 8, 2 value heads of 8 per key head
    rows = torch.arange(2 * 48.0)[:, None]  # G = 8 + 8 + 16 + 16
    qkv = unfuse("in_proj_qkvz", "in_proj_qkv", rows, lin)[:, 0].tolist()
    assert qkv == [*range(0, 8), *range(48, 56), *range(8, 16), *range(56, 64),
                   *range(16, 32), *range(64, 80)]
    assert unfuse("in_proj_qkvz", "in_proj_z", rows, lin)[:, 0].tolist() == [
        *range(32, 48), *range(80, 96)]
    ba = torch.arange(8.0)[:, None]  # per key head: b b a a
    assert unfuse("in_proj_ba", "in_proj_b", ba, lin)[:, 0].tolist() == [0, 1, 4, 5]
    assert unfuse("in_proj_ba", "in_proj_a", ba, lin)[:, 0].tolist() == [2, 3, 6, 7]


def test_prefill_incremental_and_ragged_logits_match_transformers(target, ref):
    check_prefill_and_incremental(target, ref)


def test_taps_are_transformers_hidden_states(target, ref):
    ids, toks = [0, 1, 3], [3, 1, 4, 1, 5, 9, 2, 6]
    h = Harness(target)
    h.forward({0: toks}, capture=ids)
    with torch.no_grad():
        hs = ref(torch.tensor([toks]), output_hidden_states=True).hidden_states
    assert rel_err(h.features, torch.cat([hs[i + 1][0] for i in ids], dim=-1)) < 1e-5


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_verify_block_then_rollback_to_each_accepted_length(target, ref, state_dtype):
    check_rollback(target, ref, state_dtype)


def test_greedy_dflash_equals_plain_equals_transformers_generate(target, ref, tmp_path):
    from dflash_ray import LLM, SamplingParams

    drafter = save_drafter(tmp_path / "drafter", layer_ids=(1, 2))
    params = SamplingParams(max_tokens=32)
    plain, spec = LLM(target), LLM(target, drafter, drafter_dtype="float32", **WHOLE)
    accepted = 0
    for p in ([3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8], [9]):
        want = plain.generate([p], params, use_tqdm=False)[0]
        got = spec.generate([p], params, use_tqdm=False)[0]
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False)[0, len(p):].tolist()
        assert want.token_ids == hf
        assert got.token_ids == want.token_ids
        accepted += got.num_accepted_tokens
    assert accepted > 0  # some drafts were accepted, so verify blocks were cut and rolled back


def test_plan_refuses_more_ranks_than_shared_expert_columns(target):
    cfg = TargetConfig.load(target)
    with pytest.raises(ValidationError, match="shared_expert_intermediate_size 48 < ep_size 49"):
        ShardingConfig.for_target(cfg, 1, 49)
