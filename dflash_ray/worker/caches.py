"""Cache storage on one device, one store per kind of layer cache, with an explicit commit.

Owns the tensors; the block manager (ints only) owns which KV block and which state slot belongs
to whom. After every verify the target worker calls `commit` once with, per sequence, how many
of the block's positions were kept (accepted drafts + bonus): that is the rollback of the
rejected rest. Each kind does what it needs: attention K/V forgets rejected positions by length
(the bookkeeping's `num_cached` stops before them and their slots are overwritten later), so its
commit has nothing to do; a recurrent state must be restored to the state after the last kept
position of its sequence's slot (`Commit.slot`), which a new sequence's prefill then
overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.cache_spec import AttentionCacheSpec, CacheSpec


@dataclass(slots=True)
class Commit:
    """One sequence's part of a verify: `num_verified` positions from `start`, of which the
    first `num_kept` are kept."""

    slot: int
    start: int
    num_verified: int
    num_kept: int


class PagedKVCache:
    """Keys and values of attention layers in pages of `block_len` positions."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, num_blocks * block_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_len = block_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def commit(self, commits: list[Commit]) -> None:
        """Nothing to restore: rejected positions are forgotten by length (module docstring)."""


class ModelCache:
    """Every layer's cache of one model: `layer(i)` is what layer i reads and writes."""

    def __init__(self, specs: list[CacheSpec], num_blocks: int, block_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        kinds = {type(s) for s in specs}
        if kinds - {AttentionCacheSpec}:
            raise ValueError(f"no cache store for layer kinds {sorted(k.__name__ for k in kinds)}")
        heads = {(s.num_kv_heads, s.head_dim) for s in specs}
        if len(heads) != 1:
            raise ValueError(f"attention layers of different shapes {sorted(heads)}")
        (num_kv_heads, head_dim), = heads
        self.kv = PagedKVCache(len(specs), num_blocks, block_len, num_kv_heads, head_dim, dtype,
                               device)
        self.stores = [self.kv]
        self._layers = [(self.kv, i) for i in range(len(specs))]

    def layer(self, i: int):
        store, index = self._layers[i]
        return store.layer(index)

    def commit(self, commits: list[Commit]) -> None:
        for store in self.stores:
            store.commit(commits)


def bytes_per_token(specs: list[CacheSpec], dtype: torch.dtype) -> int:
    return sum(s.bytes_per_token(dtype) for s in specs)


def bytes_per_seq(specs: list[CacheSpec], dtype: torch.dtype) -> int:
    return sum(s.bytes_per_seq(dtype) for s in specs)


def plan_cache(budget: int, per_token: int, per_seq: int, block_len: int,
               max_seqs: int) -> tuple[int | None, int]:
    """(KV blocks, state slots) for `budget` bytes. Per-sequence state is reserved first, for
    `max_seqs` sequences or as many as fit in half the budget; the rest holds KV blocks. Without
    per-sequence state every running sequence has a slot for free; without per-token state (a
    shard that holds no attention) the blocks are None: this budget does not bound them."""
    slots = max_seqs if per_seq == 0 else max(1, min(max_seqs, budget // 2 // per_seq))
    if not per_token:
        return None, slots
    return max(1, (budget - slots * per_seq) // (per_token * block_len)), slots
