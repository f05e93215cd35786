"""Draft -> verify -> accept: the small pure functions of the speculative step.

Vocabulary (used unchanged in metrics and docs):
- *block*: the B positions verified together, `[bonus, d_1 .. d_{B-1}]`; near max_tokens a block
  may be shorter (q <= B).
- *draft / target*: the drafter proposes `d_1 .. d_{q-1}` in one pass; the target scores the block.
- *proposed*: draft tokens offered (q - 1 per step); *accepted*: the leading drafts the target
  keeps (a); *bonus*: the one token the target adds after them (always exists).
- *acceptance length* tau = a + 1 tokens committed per verify step (bonus included, 1..B);
  *acceptance rate* = accepted / proposed.

Greedy: accept while d_j == argmax p_{j-1}; the bonus is argmax p_a. Sampling (temperature > 0,
top-k, top-p) has two rules. Coupled (the default): the target's choice at each position is its
own draw argmax(p / E) from noise E fixed by (seed, position), and acceptance is greedy's with
that choice in place of the argmax (`worker/sampler.py`). Rejection: standard speculative
rejection sampling, accept d_j with probability min(1, p(d_j) / q(d_j)), and on the first
rejection draw from normalize(max(p - q, 0)); when all are accepted the bonus is drawn from p at
the last position. All reproduce the target's distribution exactly (greedy: token for token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AcceptResult:
    tokens: list[int]  # committed this step: accepted drafts then the bonus (a + 1 tokens)
    num_accepted: int  # a


def processed_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """logits [n, V] -> probabilities [n, V] after temperature, top-k and top-p (fp32)."""
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        drop[:, 0] = False  # a top_p below float32's resolution must still keep one token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [n, V] -> token ids [n]."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def greedy_accept(
    drafts: torch.Tensor, target_argmax: torch.Tensor, block_lens: torch.Tensor
) -> tuple[list[int], list[int]]:
    """Batched greedy acceptance.

    drafts [N, B-1], target_argmax [N, B] (argmax of the target at each block position),
    block_lens [N] (q per sequence; positions >= q are padding).
    Returns (num_accepted a per sequence, bonus per sequence).
    """
    n, width = drafts.shape
    j = torch.arange(width, device=drafts.device)
    match = (drafts == target_argmax[:, :-1]) & (j[None, :] < (block_lens[:, None] - 1))
    accepted = match.to(torch.int32).cumprod(dim=1).sum(dim=1)  # [N]
    bonus = target_argmax.gather(1, accepted[:, None].long())[:, 0]
    return accepted.tolist(), bonus.tolist()


def rejection_accept(
    drafts: torch.Tensor,  # [q-1]
    draft_probs: torch.Tensor,  # [q-1, V] the distribution each draft was sampled from
    target_probs: torch.Tensor,  # [q, V] processed target distribution at each block position
    generator: torch.Generator | None,
) -> AcceptResult:
    num = drafts.shape[0]
    if num:
        idx = drafts[:, None]
        p = target_probs[:num].gather(1, idx)[:, 0]
        q = draft_probs.gather(1, idx)[:, 0]
        u = torch.rand(num, generator=generator, device=drafts.device)
        keep = (u * q < p).to(torch.int32).cumprod(0)
        a = int(keep.sum())
    else:
        a = 0
    if a == num:
        bonus = sample(target_probs[num : num + 1], generator)
    else:
        residual = (target_probs[a] - draft_probs[a]).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else target_probs[a]
        bonus = sample(dist[None], generator)
    return AcceptResult(drafts[:a].tolist() + bonus.tolist(), a)
