"""Training a DFlash drafter for any supported target (the recipe of dflash-spec.md §5).

Per sequence and step: random anchors a in the response; a block `[x_a, MASK x (B-1)]` per
anchor, embedded with the target's frozen embedding; every block sees the target context
strictly before its anchor and itself bidirectionally (no other block); block position k
predicts x_{a+k} (same-position labels), weighted exp(-(k-1)/gamma). Only the drafter's own
weights train; embedding and LM head stay the target's. The layer math is the inference
drafter's own modules, so what trains is exactly what serves.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dflash import DFlashDrafter
from .drafter_data import TrainSequence


def training_mask(anchors: list[int], seq_len: int, block: int) -> torch.Tensor:
    """[N*B, S + N*B] bool: block j's queries see context keys k < a_j and their own block."""
    n = len(anchors)
    a = torch.tensor(anchors)
    ctx = torch.arange(seq_len)[None, :] < a[:, None]  # [N, S]
    ctx = ctx.repeat_interleave(block, dim=0)  # [N*B, S]
    blk_of = torch.arange(n * block) // block
    own = blk_of[:, None] == blk_of[None, :]  # [N*B, N*B]
    return torch.cat((ctx, own), dim=1)


def block_attention(
    q: torch.Tensor,  # [N*B, nh, hd] block queries
    kc: torch.Tensor,  # [S, nkv, hd] context keys / values
    vc: torch.Tensor,
    kb: torch.Tensor,  # [N*B, nkv, hd] block keys / values
    vb: torch.Tensor,
    sees_ctx: torch.Tensor,  # [N, S] bool: block j sees context key k (k < anchor_j)
    block: int,
    scale: float,
) -> torch.Tensor:
    """Attention under `training_mask` without scoring the keys it masks: each block's scores
    are [its context | its own block], one softmax over both (2.7x fewer scores than the dense
    mask at 32 anchors). Returns [N*B, nh, hd]."""
    nb, nh, hd = q.shape
    n, rep = nb // block, nh // kc.shape[1]
    qh = q.view(n, block, nh, hd).permute(2, 0, 1, 3)  # [nh, N, B, hd]
    kc, vc = (t.repeat_interleave(rep, dim=1).transpose(0, 1) for t in (kc, vc))  # [nh, S, hd]
    kb, vb = (
        t.view(n, block, -1, hd).repeat_interleave(rep, dim=2).permute(2, 0, 1, 3)
        for t in (kb, vb)
    )  # [nh, N, B, hd]
    s_ctx = torch.matmul(qh.reshape(nh, nb, hd), kc.transpose(1, 2)).view(nh, n, block, -1)
    s_ctx = s_ctx.masked_fill(~sees_ctx[None, :, None, :], float("-inf"))
    s_blk = torch.matmul(qh, kb.transpose(-1, -2))  # [nh, N, B, B]
    p = torch.softmax(torch.cat((s_ctx, s_blk), dim=-1).float() * scale, dim=-1).to(q.dtype)
    ctx_len = kc.shape[1]
    out = torch.matmul(p[..., :ctx_len].reshape(nh, nb, ctx_len), vc).view(nh, n, block, hd)
    out = out + torch.matmul(p[..., ctx_len:], vb)
    return out.permute(1, 2, 0, 3).reshape(nb, nh, hd)


def sample_anchors(seq: TrainSequence, block: int, num_anchors: int, rng: random.Random):
    """Distinct anchors in the response with a whole block inside the sequence, sorted."""
    lo, hi = seq.prompt_len, len(seq.token_ids) - block
    if hi < lo:
        return []
    candidates = range(lo, hi + 1)
    return sorted(rng.sample(candidates, min(num_anchors, len(candidates))))


def block_logits(
    drafter: DFlashDrafter,
    embed: torch.Tensor,  # [V, H] target embedding (frozen)
    head: torch.Tensor,  # [V, H] target LM head (frozen)
    features: torch.Tensor,  # [S, K*H]
    token_ids: torch.Tensor,  # [S]
    anchors: list[int],
    mask_token_id: int,
    block: int,
) -> torch.Tensor:
    """Logits at block positions 1..B-1 of every anchor's block: [N, B-1, V], on the drafter's
    device (features and token ids may live on the host)."""
    n, s = len(anchors), token_ids.shape[0]
    dtype, dev = drafter.fc.weight.dtype, drafter.fc.weight.device
    a = torch.tensor(anchors, device=dev)
    ids = torch.full((n, block), mask_token_id, dtype=torch.long, device=dev)
    ids[:, 0] = token_ids.to(dev)[a]
    h = F.embedding(ids.reshape(-1), embed).to(dtype)  # [N*B, H]
    ctx = drafter.project_context(features.to(dev, dtype))  # [S, H]
    cos_c, sin_c = drafter.rope(torch.arange(s, device=dev), dtype)
    blk_pos = (a[:, None] + torch.arange(block, device=dev)[None, :]).reshape(-1)
    cos_b, sin_b = drafter.rope(blk_pos, dtype)
    sees_ctx = torch.arange(s, device=dev)[None, :] < a[:, None]  # [N, S]
    for layer in drafter.layers:
        attn = layer.self_attn
        q, kb, vb = attn.qkv(layer.input_layernorm(h), cos_b, sin_b)
        kc, vc = attn.project_kv(ctx, cos_c, sin_c)
        out = block_attention(q, kc, vc, kb, vb, sees_ctx, block, attn.scale)
        h = h + attn.o_proj(out.reshape(n * block, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = drafter.norm(h).view(n, block, -1)[:, 1:]  # [N, B-1, H]
    # under autocast the GEMM casts the head itself: no full-precision copy of a large vocab's
    if head.dtype != dtype and not torch.is_autocast_enabled(h.device.type):
        head = head.to(dtype)
    return F.linear(h, head).float()


@dataclass(slots=True)
class BlockLoss:
    loss: torch.Tensor
    correct_first: int  # argmax hits at block position 1 (the first draft)
    count_first: int
    # sum over anchors of 1 / (1 + the run of argmax hits from position 1), i.e. of the inverse
    # acceptance length greedy verification would give each block (its context is the target's
    # own output); count / this sum estimates tau per verify step (see `evaluate`)
    inv_tau_sum: float


def block_loss(
    drafter: DFlashDrafter, embed: torch.Tensor, head: torch.Tensor, seq: TrainSequence,
    anchors: list[int], mask_token_id: int, block: int, gamma: float,
) -> BlockLoss:
    ids = torch.tensor(seq.token_ids)
    logits = block_logits(drafter, embed, head, seq.features, ids, anchors, mask_token_id, block)
    dev = logits.device
    ids, a, k = ids.to(dev), torch.tensor(anchors, device=dev), torch.arange(1, block, device=dev)
    labels = ids[a[:, None] + k[None, :]]  # [N, B-1]; anchors <= S - B keep this in range
    weights = torch.exp(-(k - 1).float() / gamma)[None, :].expand_as(labels)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none").view_as(labels)
    loss = (ce * weights).sum() / weights.sum()
    hits = logits.detach().argmax(-1) == labels  # [N, B-1]
    run = hits.long().cumprod(dim=1).sum(dim=1)  # leading hits per block
    inv_tau = float((1.0 / (run + 1).double()).sum())
    return BlockLoss(loss, int(hits[:, 0].sum()), len(anchors), inv_tau)


def init_weights(drafter: nn.Module, std: float = 0.02) -> None:
    """Qwen3's initialisation: normal(0, std) linears, unit norms."""
    for name, p in drafter.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=std)


def cosine_lr(step: int, total: int, peak: float, warmup_ratio: float = 0.04) -> float:
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
