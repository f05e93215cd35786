"""What cache each layer of a model needs, declared by the model and allocated by the worker.

A model lists one spec per layer (`cache_specs()`); the worker groups the layers by kind and
allocates one store per kind (`worker/caches.py`). Attention keeps keys and values per position
(bytes per token, paged); a recurrent layer (Gated DeltaNet) would keep a fixed-size state per
sequence (bytes per sequence, in slots) that a rejected block must be rolled back from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True, slots=True)
class AttentionCacheSpec:
    """Keys and values of `num_kv_heads` heads of `head_dim` per position."""

    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * self.head_dim * element_size(dtype)

    def bytes_per_seq(self, dtype: torch.dtype) -> int:
        return 0


CacheSpec = AttentionCacheSpec  # the only kind so far; a recurrent-state spec joins it
