"""The tensor channel between the drafter actor and target rank 0, over `ray.util.collective`
(gloo on CPU, NCCL through cupy on GPU), and what crosses it each step.

Two messages per step that drafts, in this order on both sides (the same every step, so neither
side ever waits on the other in the opposite direction):

1. target -> drafter: the target features [rows, K*H] of the tokens each drafted sequence
   committed since its last draft (its prefill, or last step's accepted tokens + bonus). Target
   rank 0 keeps them from the verify that produced them until the drafter needs them, so they
   cross exactly when used and no counts travel: sequence d has `d.start - d.drafted_ctx` rows.
2. drafter -> target: the drafts [n, B-1] and, for the s sampled sequences, the distributions
   [s, B-1, V] they were drawn from (rejection sampling needs them), packed as one fp32 message
   (token ids are exact in fp32 below 2^24).

Every shape follows from the `StepBatch` both sides got as their actor-call argument. Messages
are latency-bound here (about 1 ms each on a loaded 2-core box, whatever their size), hence two.
Receives land in buffers kept across steps (grown when a batch needs more).
"""

from __future__ import annotations

import math

import ray.util.collective as col
import torch

from ..core.step_io import DecodeItem
from ..parallel.communicator import release_default_group
from ..worker.draft_worker import Drafts, PendingFeatures

TARGET_RANK, DRAFTER_RANK = 0, 1


class Channel:
    def __init__(self, name: str, rank: int, backend: str, device: torch.device):
        col.init_collective_group(2, rank, backend=backend, group_name=name)
        self.name, self.rank, self.backend, self.device = name, rank, backend, device
        self.peer = 1 - rank
        # gloo moves host memory only: GPU tensors are staged through host buffers (the setup
        # where NCCL cannot serve, two actors sharing one GPU)
        self.wire = torch.device("cpu") if backend == "gloo" else device
        self._buffers: dict[str, torch.Tensor] = {}

    def send(self, x: torch.Tensor) -> None:
        col.send(x.to(self.wire).contiguous(), self.peer, self.name)

    def buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The first `numel` elements of the `key` buffer (on the wire's device), valid until
        its next use."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            size = max(numel, 2 * buf.numel() if buf is not None else 0)
            buf = self._buffers[key] = torch.empty(size, dtype=dtype, device=self.wire)
        return buf[:numel]

    def recv(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Receive into the `key` buffer; the result (a view of it unless staged to the GPU) is
        valid until the next recv of that key."""
        view = self.buffer(key, math.prod(shape), dtype).view(shape)
        col.recv(view, self.peer, self.name)
        return view.to(self.device)

    def close(self) -> None:
        col.destroy_collective_group(self.name)
        if self.backend == "gloo":
            release_default_group()


def sampled(decodes: list[DecodeItem]) -> list[int]:
    return [i for i, d in enumerate(decodes) if d.sampling.temperature > 0]


def context_rows(decodes: list[DecodeItem]) -> list[int]:
    """Feature rows each drafted sequence needs before its draft."""
    return [d.start - d.drafted_ctx for d in decodes]


def send_features(ch: Channel, decodes: list[DecodeItem], pending: PendingFeatures) -> None:
    """Target side: the pending features of the drafted sequences, taken out of `pending`."""
    ch.send(torch.cat([pending.take(d.seq_id, rows)
                       for d, rows in zip(decodes, context_rows(decodes), strict=True)]))


def recv_features(
    ch: Channel, decodes: list[DecodeItem], feature_dim: int, dtype: torch.dtype
) -> dict[int, torch.Tensor]:
    """Drafter side: seq_id -> [rows, K*H], views of the receive buffer (drafted right away)."""
    rows = context_rows(decodes)
    flat = ch.recv("features", (sum(rows), feature_dim), dtype)
    return dict(zip([d.seq_id for d in decodes], flat.split(rows), strict=True))


def send_drafts(ch: Channel, decodes: list[DecodeItem], drafts: Drafts, vocab: int) -> None:
    n, width = drafts.tokens.shape
    rows = sampled(decodes)
    packed = ch.buffer("drafts_out", n * width + len(rows) * width * vocab, torch.float32)
    packed[: n * width] = drafts.tokens.flatten()
    probs = packed[n * width :].view(len(rows), width, vocab)
    for j, i in enumerate(rows):
        q = drafts.probs[i]  # None: no block pass for this sequence this step (q = 1)
        m = 0 if q is None else q.shape[0]
        if m:
            probs[j, :m] = q
        probs[j, m:] = 0
    ch.send(packed)


def recv_drafts(ch: Channel, decodes: list[DecodeItem], width: int, vocab: int) -> Drafts:
    """Target side; the probs are views of the receive buffer (used within this step)."""
    n, rows = len(decodes), sampled(decodes)
    packed = ch.recv("drafts", (n * width + len(rows) * width * vocab,), torch.float32)
    tokens = packed[: n * width].view(n, width).long()
    packed_probs = packed[n * width :].view(len(rows), width, vocab)
    probs: list[torch.Tensor | None] = [None] * n
    for j, i in enumerate(rows):
        probs[i] = packed_probs[j, : decodes[i].num_queries - 1]
    return Drafts(tokens, probs)
