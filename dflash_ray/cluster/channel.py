"""The tensor channel between the drafter actor and target rank 0, over `ray.util.collective`
(gloo on CPU, NCCL through cupy on GPU), and what crosses it each step with a drafter pass.

Two messages per such step, in this order on both sides (the same every step, so neither
side ever waits on the other in the opposite direction):

1. target -> drafter: the target features [rows, K*H] of the tokens each of the drafter's
   decodes committed since its last pass (its prefill, or the accepted tokens + bonus of the
   steps since). Target rank 0 keeps them from the verify that produced them until the drafter
   needs them, so they cross exactly when used and no counts travel: decode d has
   `d.context_rows` rows.
2. drafter -> target: the drafts [N, B-1] of every decode and, for each sampled decode the
   drafter drafts (q > 1), the distributions [q-1, V] its drafts were drawn from (rejection
   sampling needs them), packed as one fp32 message (token ids are exact in fp32 below 2^24).

Every shape follows from the `StepBatch` both sides got as their actor-call argument. Messages
are latency-bound here (about 1 ms each on a loaded 2-core box, whatever their size), hence two.
Receives land in buffers kept across steps (grown when a batch needs more). Each transfer is a
span of the step (`worker.trace`), with its bytes.
"""

from __future__ import annotations

import math
import time

import ray.util.collective as col
import torch

from ..core.step_io import StepBatch
from ..parallel.communicator import release_default_group
from ..worker.drafts import Drafts
from ..worker.trace import record

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


def sampled(batch: StepBatch) -> list[int]:
    """Decodes whose drafts come with distributions: those the drafter drafts that rejection
    sampling will accept (greedy and coupled blocks are accepted by equality)."""
    return [i for i in batch.drafter_decodes()
            if batch.decodes[i].sampling.needs_draft_probs and batch.decodes[i].num_queries > 1]


def send_features(ch: Channel, features: torch.Tensor) -> None:
    """Target side: the drafter's decodes' waiting features, concatenated in batch order."""
    start = time.monotonic()
    ch.send(features)
    record("channel", "send_features", start, features.numel() * features.element_size())


def recv_features(ch: Channel, batch: StepBatch, feature_dim: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Drafter side: [rows, K*H], a view of the receive buffer (drafted right away)."""
    start = time.monotonic()
    rows = sum(batch.decodes[i].context_rows for i in batch.drafter_decodes())
    features = ch.recv("features", (rows, feature_dim), dtype)
    record("channel", "recv_features", start, features.numel() * features.element_size())
    return features


def send_drafts(ch: Channel, batch: StepBatch, drafts: Drafts, vocab: int) -> None:
    start = time.monotonic()
    n, width = drafts.tokens.shape
    rows = sampled(batch)
    sizes = [batch.decodes[i].num_queries - 1 for i in rows]
    packed = ch.buffer("drafts_out", n * width + sum(sizes) * vocab, torch.float32)
    packed[: n * width] = drafts.tokens.flatten()
    probs = packed[n * width :].view(sum(sizes), vocab)
    at = 0
    for i, size in zip(rows, sizes, strict=True):
        q = drafts.probs[i]  # the rows computed: fewer when the drafter's confidence ran out
        m = 0 if q is None else min(size, q.shape[0])
        if m:
            probs[at : at + m] = q[:m]
        probs[at + m : at + size] = 0  # never read: past the proposed drafts
        at += size
    ch.send(packed)
    record("channel", "send_drafts", start, packed.numel() * 4)


def recv_drafts(ch: Channel, batch: StepBatch, width: int, vocab: int) -> Drafts:
    """Target side; the probs are views of the receive buffer (used within this step)."""
    start = time.monotonic()
    n, rows = len(batch.decodes), sampled(batch)
    sizes = [batch.decodes[i].num_queries - 1 for i in rows]
    packed = ch.recv("drafts", (n * width + sum(sizes) * vocab,), torch.float32)
    tokens = packed[: n * width].view(n, width).long()
    packed_probs = packed[n * width :].view(sum(sizes), vocab)
    probs: list[torch.Tensor | None] = [None] * n
    at = 0
    for i, size in zip(rows, sizes, strict=True):
        probs[i] = packed_probs[at : at + size]
        at += size
    record("channel", "recv_drafts", start, packed.numel() * 4)
    return Drafts.of(tokens, probs, [d.num_queries for d in batch.decodes])
