"""Sampling on the workers: the target's first token after a prefill, acceptance of every
verify block of a batch, and the random streams both sides draw from.

Every random draw is seeded by (request seed, position of the block's bonus, stream): the
drafter's and the target's streams are independent (rejection sampling needs the target's
uniforms independent of the drafts), a step's draws do not depend on which other requests share
it, and a preempted request recomputed from its tokens draws exactly what it would have. (A
plain step and a speculative one at the same position draw differently: the text is then the
same only while the same steps speculate.) No state is kept per sequence.
"""

from __future__ import annotations

import torch

from ..core.step_io import DecodeItem, SamplingSpec, SeqResult
from ..spec_decode import greedy_accept, processed_probs, rejection_accept, sample
from .drafts import Drafts

_STREAM = {"target": 0x243F6A8885A308D3, "drafter": 0x13198A2E03707344}
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: nearby inputs give unrelated seeds."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def generator(spec: SamplingSpec, position: int, stream: str, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix(_mix(spec.seed ^ _STREAM[stream]) + position) & ((1 << 63) - 1))
    return gen


def pick(logits: torch.Tensor, spec: SamplingSpec, position: int) -> int:
    """One target token from logits [1, V] at `position`: argmax, or a sample."""
    if spec.greedy:
        return int(logits[0].argmax())
    probs = processed_probs(logits, spec.temperature, spec.top_k, spec.top_p)
    return int(sample(probs, generator(spec, position, "target", logits.device))[0])


def accept(decodes: list[DecodeItem], logits: torch.Tensor | None, row: int,
           drafts: Drafts | None) -> list[SeqResult]:
    """Acceptance for every decode: `logits` rows from `row` on hold each decode's verified
    block (1 + proposed rows) in batch order. Greedy blocks are checked together."""
    if not decodes:
        return []
    n = len(decodes)
    proposed = drafts.num_proposed if drafts is not None else [0] * n
    q_lens = [1 + p for p in proposed]
    # [N, max q] target logits rows gathered per sequence (padding repeats row 0)
    index = torch.zeros(n, max(q_lens), dtype=torch.long, device=logits.device)
    start = row
    for i, q in enumerate(q_lens):
        index[i, :q] = torch.arange(start, start + q)
        start += q
    tokens = drafts.tokens if drafts is not None else None
    accepted: list[int] = [0] * n
    committed: list[list[int]] = [[] for _ in range(n)]
    greedy = [i for i, d in enumerate(decodes) if d.sampling.greedy]
    if greedy:
        g = torch.tensor(greedy, device=logits.device)
        argmax = logits[index[g]].argmax(dim=-1)  # [G, max q]
        if tokens is None:
            acc, bonus = [0] * len(greedy), argmax[:, 0].tolist()
        else:
            lens = torch.tensor([q_lens[i] for i in greedy])
            acc, bonus = greedy_accept(tokens[g][:, : argmax.shape[1] - 1], argmax, lens)
        for j, i in enumerate(greedy):
            accepted[i] = acc[j]
            committed[i] = tokens[i, : acc[j]].tolist() if tokens is not None else []
            committed[i].append(bonus[j])
    for i, d in enumerate(decodes):
        s = d.sampling
        if s.greedy:
            continue
        q = q_lens[i]
        target_probs = processed_probs(logits[index[i, :q]], s.temperature, s.top_k, s.top_p)
        gen = generator(s, d.start, "target", logits.device)
        if q == 1:
            committed[i] = sample(target_probs[:1], gen).tolist()
        else:
            res = rejection_accept(tokens[i, : q - 1], drafts.probs[i][: q - 1], target_probs, gen)
            committed[i], accepted[i] = res.tokens, res.num_accepted
    return [SeqResult(d.seq_id, committed[i], proposed[i], accepted[i])
            for i, d in enumerate(decodes)]
