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


@pytest.mark.parametrize("max_tokens", [37, 64])
def test_tokens_and_acceptance_lengths_match_zlab(setup, max_tokens):
    llm, ref_target, ref_drafter = setup
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
