"""Training data for a DFlash drafter: target-regenerated sequences and their target features.

Owns (1) regenerating responses with the target itself (greedy, through our engine, batched), so
the drafter learns what the target actually says, and (2) capturing the target's hidden states
at the drafter's `target_layer_ids` for every position, once (the target is frozen). Works for
any supported target directory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..kv_cache import PagedKVCache, SeqSpan, build_layout
from ..models.qwen3 import Qwen3Target


@dataclass(slots=True)
class TrainSequence:
    token_ids: list[int]  # prompt + regenerated response
    prompt_len: int
    features: torch.Tensor | None = None  # [S, K*H] target features (bf16 to save memory)


def prompt_windows(token_stream: list[int], n: int, min_len: int, max_len: int,
                   seed: int) -> list[list[int]]:
    """n random windows of a token stream, as prompts for regeneration."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        start = rng.randrange(0, max(1, len(token_stream) - length))
        out.append(token_stream[start : start + length])
    return out


def regenerate(target_dir: str, prompts: list[list[int]], max_tokens: int,
               batch: int = 64, device: str = "cpu") -> list[TrainSequence]:
    """Greedy target continuations of `prompts` (stopping at EOS), in batches, on `device`."""
    from ..llm import LLM
    from ..sampling_params import SamplingParams

    llm = LLM(target_dir, max_num_seqs=batch, device=device)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    seqs = []
    for i in tqdm(range(0, len(prompts), batch), desc="regenerate", unit="batch"):
        chunk = prompts[i : i + batch]
        for prompt, out in zip(chunk, llm.generate(chunk, params, use_tqdm=False), strict=True):
            seqs.append(TrainSequence(prompt + out.token_ids, len(prompt)))
    llm.engine.shutdown()
    return seqs


@torch.inference_mode()
def capture_features(target: Qwen3Target, seqs: list[TrainSequence], layer_ids: list[int],
                     batch_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16) -> None:
    """Fill `seq.features` with the target's features at `layer_ids` for every position."""
    device = target.embed_tokens.weight.device
    blen = 16
    d = target.cfg.decoder
    i = 0
    bar = tqdm(total=len(seqs), desc="target features", unit="seq")
    while i < len(seqs):
        group, tokens = [], 0
        while i < len(seqs) and (not group or tokens + len(seqs[i].token_ids) <= batch_tokens):
            group.append(seqs[i])
            tokens += len(seqs[i].token_ids)
            i += 1
        num_blocks = sum((len(s.token_ids) + blen - 1) // blen for s in group)
        cache = PagedKVCache(d.num_layers, num_blocks, blen, target.num_kv_heads, d.head_dim,
                             target.embed_tokens.weight.dtype, device)
        spans, ids, pos, next_block = [], [], [], 0
        for s in group:
            n = len(s.token_ids)
            nb = (n + blen - 1) // blen
            spans.append(SeqSpan(list(range(next_block, next_block + nb)), 0, n, n))
            next_block += nb
            ids += s.token_ids
            pos += range(n)
        slots, groups = build_layout(spans, blen, causal=True, device=device)
        _, feats = target(torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                          cache, slots, groups, capture=layer_ids)
        offset = 0
        for s in group:
            n = len(s.token_ids)
            s.features = feats[offset : offset + n].to(dtype).cpu()
            offset += n
        bar.update(len(group))
    bar.close()
