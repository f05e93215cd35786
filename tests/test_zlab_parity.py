"""Parity with the reference implementation: z-lab's `dflash` 0.1.0 `dflash_generate` (batch 1,
transformers target, DynamicCache) on the same checkpoints: identical tokens and identical
per-step acceptance lengths at temperature 0."""

from __future__ import annotations

import time

import dflash.model as zlab
import pytest
import torch
from transformers import AutoModelForCausalLM

from dflash_ray import LLM, SamplingParams

from .conftest import VOCAB, save_drafter

# z-lab times with torch.cuda.synchronize(); on a CPU-only torch swap in a plain clock.
zlab._cuda_time = time.perf_counter

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [20], list(range(3, 30))]


@pytest.fixture(scope="module", params=["qwen3", "moe"])
def setup(request, tiny, tmp_path_factory):
    target = tiny[request.param]
    drafter = save_drafter(
        tmp_path_factory.mktemp("d") / "b16", seed=3, block_size=16, layer_ids=(0, 2, 3)
    )
    ref_target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ref_drafter = zlab.DFlashDraftModel.from_pretrained(drafter, dtype=torch.float32).eval()
    # z-lab's reference runs in fp32: so does our drafter here (auto may pick bf16)
    llm = LLM(target, drafter, drafter_dtype="float32", spec_profile="whole_block")
    return llm, ref_target, ref_drafter


def assert_generations_match_zlab(llm, ref_target, ref_drafter, max_tokens: int) -> None:
    """Our batched generation of PROMPTS against z-lab's loop, one prompt at a time: the same
    tokens and acceptance lengths, with some drafts accepted."""
    ours = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens), use_tqdm=False)
    total_accepted = 0
    for prompt, out in zip(PROMPTS, ours, strict=True):
        ref = zlab.dflash_generate(
            ref_drafter, ref_target, torch.tensor([prompt]), max_tokens, None, return_stats=True
        )
        assert out.token_ids == ref.output_ids[0, len(prompt) :].tolist()
        assert out.acceptance_lengths == ref.acceptance_lengths
        total_accepted += sum(a - 1 for a in ref.acceptance_lengths)
    assert total_accepted > 0, "the comparison should include accepted drafts"


@pytest.mark.parametrize("max_tokens", [37, 64])
def test_tokens_and_acceptance_lengths_match_zlab(setup, max_tokens):
    assert_generations_match_zlab(*setup, max_tokens)


def test_stop_token_inside_block_matches_zlab(setup):
    llm, ref_target, ref_drafter = setup
    prompt = PROMPTS[1]
    plain = llm.generate([prompt], SamplingParams(max_tokens=40), use_tqdm=False)[0]
    stop = plain.token_ids[17]  # some token that appears mid-generation
    ours = llm.generate(
        [prompt], SamplingParams(max_tokens=40, stop_token_ids=[stop]), use_tqdm=False
    )[0]
    ref = zlab.dflash_generate(
        ref_drafter, ref_target, torch.tensor([prompt]), 40, [stop], return_stats=True
    )
    assert ours.token_ids == ref.output_ids[0, len(prompt) :].tolist()
    assert ours.token_ids[-1] == stop and ours.finish_reason == "stop"
    assert ours.acceptance_lengths == ref.acceptance_lengths
    assert VOCAB > stop >= 0


# Sliding-window drafters (z-lab's Qwen3.5-MoE ones): sliding and full layers mixed, a window
# (3) shorter than context + block so it cuts. is_causal unset: sliding layers causal + window,
# full layers non-causal; False: every layer non-causal (the window two-sided); True: every layer
# causal; use_sliding_window false: transformers' Qwen3Config drops the window.
SLIDING = {
    "sliding": {"use_sliding_window": True},
    "non_causal": {"use_sliding_window": True, "is_causal": False},
    "causal": {"use_sliding_window": True, "is_causal": True},
    "window_off": {"use_sliding_window": False},
}


def save_sliding_drafter(path, block_size: int = 8, **extra) -> str:
    return save_drafter(
        path, seed=5, block_size=block_size, layer_ids=(0, 2, 3), num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=3, **extra,
    )


@pytest.mark.parametrize("variant", sorted(SLIDING))
def test_sliding_window_drafter_block_matches_zlab(tmp_path, variant):
    """One draft pass over [context of 6, block of 8]: our paged drafter's hidden states and
    draft logits against z-lab's `DFlashDraftModel.forward` (no cache: keys are the context then
    the block, at positions 0..13)."""
    from dflash_ray.models.dflash import DFlashDrafter
    from dflash_ray.models.hf_config import AttentionKind
    from dflash_ray.worker.caches import PagedKVCache
    from dflash_ray.worker.layout import SeqSpan, drafter_layout, slot_mapping

    path = save_sliding_drafter(tmp_path / variant, **SLIDING[variant])
    ref = zlab.DFlashDraftModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = DFlashDrafter.from_pretrained(path)
    want_kinds = {
        "sliding": [AttentionKind(True, 3), AttentionKind(False, None), AttentionKind(True, 3)],
        "non_causal": [AttentionKind(False, 3), AttentionKind(False, None),
                       AttentionKind(False, 3)],
        "causal": [AttentionKind(True, 3), AttentionKind(True, None), AttentionKind(True, 3)],
        "window_off": [AttentionKind(True, None), AttentionKind(False, None),
                       AttentionKind(True, None)],
    }[variant]
    assert list(ours.cfg.layer_attention) == want_kinds
    assert [(a.is_causal, a.sliding_window) for a in (layer.self_attn for layer in ref.layers)] \
        == [(k.causal, k.window) for k in want_kinds]
    ctx, block, blen = 6, 8, 4
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(ctx, ours.fc.in_features, generator=gen)
    noise = torch.randn(block, ours.cfg.decoder.hidden_size, generator=gen)
    head = torch.randn(VOCAB, ours.cfg.decoder.hidden_size, generator=gen)
    with torch.inference_mode():
        want = ref(position_ids=torch.arange(ctx + block)[None], noise_embedding=noise[None],
                   target_hidden=feats[None])[0]
        d = ours.cfg.decoder
        cache = PagedKVCache(d.num_layers, 5, blen, d.num_kv_heads, d.head_dim, torch.float32,
                             "cpu")
        table = [3, 0, 4, 1]  # out of order, so a slot/position mix-up shows
        ours.materialize_context(feats, torch.arange(ctx),
                                 slot_mapping([SeqSpan(table, 0, ctx, 0)], blen, "cpu"), cache)
        slots, groups = drafter_layout([SeqSpan(table, ctx, block, block)], blen,
                                       ours.attention_kinds(), "cpu")
        got = ours(noise, torch.arange(ctx, ctx + block), cache, slots, groups)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    logits_want, logits_got = want[1:] @ head.T, got[1:] @ head.T
    assert torch.allclose(logits_got, logits_want, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits_got.argmax(-1), logits_want.argmax(-1))


@pytest.fixture(scope="module", params=["sliding", "non_causal"])
def sliding_setup(request, tiny, tmp_path_factory):
    drafter = save_sliding_drafter(tmp_path_factory.mktemp("swa") / request.param,
                                   **SLIDING[request.param])
    ref_target = AutoModelForCausalLM.from_pretrained(tiny["qwen3"], dtype=torch.float32).eval()
    ref_drafter = zlab.DFlashDraftModel.from_pretrained(drafter, dtype=torch.float32).eval()
    llm = LLM(tiny["qwen3"], drafter, drafter_dtype="float32", spec_profile="whole_block")
    return llm, ref_target, ref_drafter


def test_sliding_window_drafter_tokens_and_acceptance_lengths_match_zlab(sliding_setup):
    """Whole generations, batched on our side (sequences of different lengths share the masks
    of a step), one at a time in z-lab's: the context grows past the window every step."""
    assert_generations_match_zlab(*sliding_setup, 37)
