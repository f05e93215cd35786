"""The per-forward attention layout built from block tables: where each new token's K/V goes
(`slot_mapping`) and which cached keys each query reads (`build_layout` -> `AttentionGroup`s).

A sequence's block table maps position p to slot `table[p // block_len] * block_len + p %
block_len`; the target cache and the drafter cache share block ids, so one table serves both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..models.hf_config import AttentionKind
from ..ops import AttentionGroup


@dataclass(slots=True)
class SeqSpan:
    """One sequence's part of a forward: `num_new` tokens at positions
    `num_cached .. num_cached+num_new-1`, of which `num_queries` (the last ones) ask attention."""

    block_table: list[int]
    num_cached: int
    num_new: int
    num_queries: int


def slot_mapping(spans: list[SeqSpan], block_len: int, device) -> torch.Tensor:
    """Cache slots of every new token of every span, flattened in span order: [sum(num_new)]."""
    rows = []
    for s in spans:
        t = s.block_table
        rows.extend(
            t[p // block_len] * block_len + p % block_len
            for p in range(s.num_cached, s.num_cached + s.num_new)
        )
    return torch.tensor(rows, dtype=torch.long, device=device)


def build_layout(
    spans: list[SeqSpan],
    block_len: int,
    causal: bool,
    device: torch.device | str,
    query_offset: int = 0,
    window: int | None = None,
) -> tuple[torch.Tensor, list[AttentionGroup]]:
    """Write slots for every new token, and attention groups for the query tokens.

    Returns write_slots [sum(num_new)] and groups. Queries of span i are rows
    `query_offset + sum(num_queries[:i]) ...` of the flattened query batch. Spans with long query
    runs (prefills) each get their own group; the short ones (decode blocks) share one, so a
    decode batch costs one SDPA call per layer. `window` W (sliding-window layers): a query at
    position p sees only keys k with p - k < W, and, when not causal, also k - p < W.
    """
    write_slots = slot_mapping(spans, block_len, device)
    return write_slots, attention_groups(spans, block_len, causal, device, query_offset, window)


def attention_groups(
    spans: list[SeqSpan],
    block_len: int,
    causal: bool,
    device: torch.device | str,
    query_offset: int = 0,
    window: int | None = None,
) -> list[AttentionGroup]:
    """The groups of `build_layout` alone (one layout's masks for another kind of layer over
    the same write slots)."""
    short = [i for i, s in enumerate(spans) if s.num_queries <= 32]
    long = [[i] for i, s in enumerate(spans) if s.num_queries > 32]
    starts, acc = [], query_offset
    for s in spans:
        starts.append(acc)
        acc += s.num_queries
    return [
        _group([spans[i] for i in idx], [starts[i] for i in idx], block_len, causal, window,
               device)
        for idx in ([short] if short else []) + long
    ]


def drafter_layout(
    spans: list[SeqSpan],
    block_len: int,
    kinds: Iterable[AttentionKind],
    device: torch.device | str,
) -> tuple[torch.Tensor, dict[AttentionKind, list[AttentionGroup]]]:
    """The drafter's block pass: write slots, and the groups of each kind of attention its
    layers have (`DrafterConfig.layer_attention`), built once per kind and shared by its
    layers."""
    write_slots = slot_mapping(spans, block_len, device)
    return write_slots, {
        k: attention_groups(spans, block_len, k.causal, device, window=k.window)
        for k in dict.fromkeys(kinds)
    }


def _group(
    spans: list[SeqSpan], starts: list[int], block_len: int, causal: bool, window: int | None,
    device,
) -> AttentionGroup:
    n = len(spans)
    max_q = max(s.num_queries for s in spans)
    key_lens = [s.num_cached + s.num_new for s in spans]
    max_k = max(key_lens)
    max_blocks = (max_k + block_len - 1) // block_len
    tables = torch.tensor(
        [
            s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table[:max_blocks]))
            for s in spans
        ],
        dtype=torch.long,
    )  # [N, max_blocks]
    kpos = torch.arange(max_k)
    key_slots = tables[:, kpos // block_len] * block_len + kpos % block_len  # [N, K]
    qi = torch.arange(max_q)
    num_q = torch.tensor([s.num_queries for s in spans])
    query_valid = qi[None, :] < num_q[:, None]  # [N, Q]
    query_rows = torch.where(query_valid, torch.tensor(starts)[:, None] + qi[None, :], 0)
    klen = torch.tensor(key_lens)
    mask = kpos[None, None, :] < klen[:, None, None]  # [N, 1, K] -> broadcast over Q
    mask = mask.expand(n, max_q, max_k)
    # query j of span i sits at position p = key_len - num_queries + j
    qpos = (klen[:, None] - num_q[:, None] + qi[None, :])[:, :, None]  # [N, Q, 1]
    k = kpos[None, None, :]  # (compared against [N, Q, 1] bounds: bool masks, no int [N, Q, K])
    if causal:
        mask = mask & (k <= qpos)
    if window is not None:  # p - k < W, and for a non-causal window k - p < W too
        mask = mask & (k > qpos - window)
        if not causal:
            mask = mask & (k < qpos + window)
    # padded query rows attend to key 0 so SDPA never sees an all-False row (output dropped)
    mask = mask | (~query_valid[:, :, None] & (kpos == 0)[None, None, :])
    return AttentionGroup(
        query_rows=query_rows.to(device),
        query_valid=query_valid.to(device),
        key_slots=key_slots.to(device),
        mask=mask[:, None].to(device),
        dense=starts == list(range(0, n * max_q, max_q))
        and all(s.num_queries == max_q for s in spans),
    )
