"""Sampling on the workers: the target's first token after a prefill, acceptance of every
verify block of a batch, and the random streams both sides draw from.

Every random draw is seeded by (request seed, position, stream), so a step's draws do not depend
on which other requests share it, and a preempted request recomputed from its tokens draws
exactly what it would have. No state is kept per sequence. Two rules for sampled requests
(`SamplingSpec.coupled`, EngineConfig.sampling):

- coupled: the token chosen by the logits row of input position t is argmax(p / E_t), E_t
  exponential noise [V] of its own generator per (seed, t) (the Gumbel-max trick: an exact
  sample of p). The drafter proposes with the same E_t, and a block is accepted like a greedy
  one, while the drafts equal the target's own choices. Every token is then the target's draw
  from its own noise, whichever steps speculate: the text is a function of the seed and the
  target's logits alone.
- rejection: speculative rejection sampling with one generator per block (position of its
  bonus); the drafter's stream is independent of the target's, as rejection sampling needs.
  A plain step and a speculative one at the same position draw differently, so the text is the
  same only while the same steps speculate.
"""

from __future__ import annotations

import torch

from ..core.step_io import DecodeItem, SamplingSpec, SeqResult
from ..spec_decode import greedy_accept, processed_probs, rejection_accept, sample
from .drafts import Drafts

_STREAM = {"target": 0x243F6A8885A308D3, "drafter": 0x13198A2E03707344,
           "coupled": 0xA4093822299F31D0}
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


def coupled_draw(probs: torch.Tensor, spec: SamplingSpec, position: int) -> torch.Tensor:
    """probs [n, V] of input positions position..position+n-1 -> tokens [n]: argmax(p / E)
    with each position's own exponential noise, an exact sample of each row (P(k) = p_k)."""
    n, vocab = probs.shape
    noise = torch.empty(n, vocab, dtype=torch.float32, device=probs.device)
    for r in range(n):  # a generator per position: its noise is the same in any block
        noise[r].exponential_(generator=generator(spec, position + r, "coupled", probs.device))
    # E = 0 would make p / E inf, or nan where p = 0 (nan wins argmax): keep it positive
    return (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def pick(logits: torch.Tensor, spec: SamplingSpec, position: int) -> int:
    """One target token from logits [1, V] at `position`: argmax, or a sample."""
    if spec.greedy:
        return int(logits[0].argmax())
    probs = processed_probs(logits, spec.temperature, spec.top_k, spec.top_p)
    if spec.coupled:
        return int(coupled_draw(probs, spec, position)[0])
    return int(sample(probs, generator(spec, position, "target", logits.device))[0])


def accept(decodes: list[DecodeItem], logits: torch.Tensor | None, row: int,
           drafts: Drafts | None) -> list[SeqResult]:
    """Acceptance for every decode: `logits` rows from `row` on hold each decode's verified
    block (1 + proposed rows) in batch order. Greedy and coupled blocks, accepted while the
    drafts equal the target's choices, are checked together."""
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
    equal = [i for i, d in enumerate(decodes) if not d.sampling.needs_draft_probs]
    if equal:
        g = torch.tensor(equal, device=logits.device)
        choice = logits[index[g]].argmax(dim=-1)  # [G, max q] the target's choice per row
        for j, i in enumerate(equal):
            s, q = decodes[i].sampling, q_lens[i]
            if not s.greedy:  # coupled: the target's own draw replaces the argmax
                probs = processed_probs(logits[index[i, :q]], s.temperature, s.top_k, s.top_p)
                choice[j, :q] = coupled_draw(probs, s, decodes[i].start)
        if tokens is None:
            acc, bonus = [0] * len(equal), choice[:, 0].tolist()
        else:
            lens = torch.tensor([q_lens[i] for i in equal])
            acc, bonus = greedy_accept(tokens[g][:, : choice.shape[1] - 1], choice, lens)
        for j, i in enumerate(equal):
            accepted[i] = acc[j]
            committed[i] = tokens[i, : acc[j]].tolist() if tokens is not None else []
            committed[i].append(bonus[j])
    for i, d in enumerate(decodes):
        s = d.sampling
        if not s.needs_draft_probs:
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
