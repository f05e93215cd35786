"""Benchmark prompts: held-out Python standard-library code when the target has our tokenizer
(the demo pair), else deterministic token-id prompts for any target."""

from __future__ import annotations

import random
from pathlib import Path


def bench_prompts(target_dir: str, n: int, prompt_tokens: int = 64, seed: int = 0):
    if (Path(target_dir) / "tokenizer.json").is_file():
        try:
            from ..core.tokenizer import Tokenizer
            from ..train.corpus import heldout_prompts

            prompts = heldout_prompts(Tokenizer(target_dir), n, prompt_tokens, seed)
            if len(prompts) >= n:
                return prompts[:n]
        except (ImportError, ValueError):
            pass
    from ..models.hf_config import TargetConfig

    top = min(TargetConfig.load(target_dir).vocab_size - 1, 200)
    rng = random.Random(seed)
    return [[rng.randrange(1, top) for _ in range(prompt_tokens)] for _ in range(n)]
