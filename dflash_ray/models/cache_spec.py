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

    def bytes_per_seq(self, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class RecurrentStateSpec:
    """A Gated DeltaNet layer's per-sequence state: the conv window (the last `conv_kernel - 1`
    inputs of its `conv_dim` channels, kept in the model dtype: they are the layer's own
    activations, so any wider dtype would only copy them) and the recurrent state
    [num_v_heads, k_head_dim, v_head_dim] in the state dtype (fp32 by default)."""

    conv_dim: int
    conv_kernel: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def bytes_per_seq(self, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
        conv = (self.conv_kernel - 1) * self.conv_dim * element_size(dtype)
        return conv + self.num_v_heads * self.k_head_dim * self.v_head_dim * element_size(
            state_dtype)


CacheSpec = AttentionCacheSpec | RecurrentStateSpec
