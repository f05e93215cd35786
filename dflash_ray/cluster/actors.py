"""The actors of the Ray executor: one drafter, N target shards. Plain classes (the executor wraps
them with `ray.remote` and its placement options); each method is one RPC, and `step` is the only
one called per engine step.

A drafter step (only on the engine's drafter-pass steps): receive the speculating sequences'
waiting target features, draft the q > 1 blocks, send the drafts. A target shard step: rank 0
sends those features and receives the drafts, then broadcasts the drafts (with an ok flag) to
the other ranks; every rank runs the forward (the layers all-reduce over the shard group); rank
0 accepts and keeps the committed tokens' features until the drafter's next pass. When the
channel breaks (the drafter died) rank 0 verifies the drafted sequences as plain decodes
instead, so the step still commits correct tokens, and says so in its result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import ray
import torch

from ..core.step_io import SeqResult, StepBatch
from ..models.hf_config import TargetConfig
from ..models.sharding import shard_spec
from ..parallel.communicator import LOCAL, GroupCommunicator, connect_store, open_store
from ..worker.draft_worker import NO_DRAFT, Drafts, DraftWorker, PendingFeatures
from ..worker.target_worker import TargetWorker
from ..worker.worker_config import ModelSpec, RunnerConfig, kv_blocks_that_fit
from .channel import (
    DRAFTER_RANK,
    TARGET_RANK,
    Channel,
    recv_drafts,
    recv_features,
    send_drafts,
    send_features,
)

log = logging.getLogger(__name__)


# Step timestamps are time.monotonic(), one clock for every process of a node: the executor
# lines the two sides up to tell transfer time from waiting on the other side.


@dataclass(slots=True)
class DrafterStepOut:
    posted: float  # waiting for the features from here
    received: float
    drafted: float  # drafts ready, sending from here


@dataclass(slots=True)
class TargetStepOut:
    results: list[SeqResult]
    channel_ok: bool  # False: the drafter channel broke this step (drafted rows went plain)
    verify_seconds: float
    sending: float = 0.0  # features to the drafter from here (0: nothing crossed)
    received: float = 0.0  # drafts in


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic()


def _started(rc: RunnerConfig, kv_bytes: int) -> dict:
    return {
        "kv_blocks_fit": kv_blocks_that_fit(rc, kv_bytes),
        "kv_bytes_per_token": kv_bytes,
        "pid": os.getpid(),
        "gpu_ids": ray.get_gpu_ids(),
    }


class DrafterActor:
    def __init__(self, rc: RunnerConfig):
        self.rc, self.spec = rc, ModelSpec.resolve(rc)
        self.worker = DraftWorker(rc, self.spec)
        self.channel: Channel | None = None

    def ready(self) -> dict:
        return _started(self.rc, self.worker.kv_bytes_per_token())

    def allocate(self, num_blocks: int) -> None:
        self.worker.allocate(num_blocks)

    def connect_channel(self, name: str, backend: str) -> None:
        self.channel = Channel(name, DRAFTER_RANK, backend, self.worker.device)

    def step(self, batch: StepBatch, released: list[int]) -> DrafterStepOut:
        """Draft `batch.decodes` (every one speculating); forget `released` sequences."""
        try:
            return self._step(batch, released)
        except BaseException:
            # Close the channel so target rank 0 fails its transfer now instead of waiting.
            if self.channel is not None:
                self.channel.close()
                self.channel = None
            raise

    def _step(self, batch: StepBatch, released: list[int]) -> DrafterStepOut:
        w, ch = self.worker, self.channel
        w.release(released)
        posted = time.monotonic()
        # features cross in the target's dtype; the drafter casts them to its own
        w.absorb(recv_features(ch, batch.decodes, self.spec.feature_dim, w.cfg.torch_dtype))
        received = _sync(w.device)
        drafts = w.draft(batch.decodes)
        drafted = _sync(w.device)
        send_drafts(ch, batch.decodes, drafts, self.spec.vocab_size)
        return DrafterStepOut(posted, received, drafted)


class TargetShardActor:
    def __init__(self, rc: RunnerConfig, rank: int, world_size: int):
        self.rc, self.spec = rc, ModelSpec.resolve(rc)
        self.rank, self.world_size = rank, world_size
        shard = None
        self.comm = LOCAL
        if world_size > 1:
            cfg = TargetConfig.load(rc.target)
            shard = shard_spec(cfg, rank, world_size, world_size)
            self.comm = GroupCommunicator(rank, world_size)
        self.worker = TargetWorker(rc, self.spec, shard, self.comm)
        self.channel: Channel | None = None
        self._store = None
        # features of committed tokens the drafter has not received yet
        self._pending = PendingFeatures()

    def ready(self) -> dict:
        return _started(self.rc, self.worker.kv_bytes_per_token())

    def open_store(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0 serves the shard group's rendezvous; returns its address."""
        host = ray.util.get_node_ip_address()
        self._store, port = open_store(host, timeout_s)
        return host, port

    def join_group(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        store = self._store or connect_store(host, port, timeout_s)
        self.comm.connect(backend, store, "shards", timeout_s, self.worker.device)

    def allocate(self, num_blocks: int) -> None:
        self.worker.allocate(num_blocks)

    def connect_channel(self, name: str, backend: str) -> None:
        self._close_channel()
        self.channel = Channel(name, TARGET_RANK, backend, self.worker.device)

    def _close_channel(self) -> None:
        if self.channel is not None:
            try:
                self.channel.close()
            except Exception:  # a dead peer can make teardown complain; the group is gone anyway
                log.warning("closing drafter channel %s failed", self.channel.name, exc_info=True)
            self.channel = None

    def step(
        self, batch: StepBatch, drafted: list[int], feed: list[int] | None, released: list[int]
    ) -> TargetStepOut | None:
        """`drafted`: indices of the decodes the drafter takes this step (all others come with
        q = 1); `feed`: indices of the decodes whose committed features the drafter will need
        (with every prefill's), None without a drafter. Rank 0 returns the results."""
        w = self.worker
        self._forget(released + batch.dropped)
        w.release(released)
        decodes = [batch.decodes[i] for i in drafted]
        width = self.spec.block_size - 1
        ok, got, sending, received = True, None, 0.0, 0.0
        if self.rank == 0 and drafted:
            try:
                sending = time.monotonic()
                send_features(self.channel, decodes, self._pending)
                got = recv_drafts(self.channel, decodes, width, self.spec.vocab_size)
                received = _sync(w.device)
            except Exception as exc:
                ok = self._channel_broke(exc)
        if self.world_size > 1 and drafted:
            # [ok, tokens...]: every rank needs the block tokens, and the same fallback choice.
            header = torch.zeros(1 + len(drafted) * width, dtype=torch.long, device=w.device)
            if self.rank == 0 and ok:
                header[0] = 1
                header[1:] = got.tokens.flatten()
            self.comm.broadcast(header)
            ok = bool(header[0])
            if self.rank != 0 and ok:
                got = Drafts(header[1:].view(len(drafted), width), [None] * len(drafted))
        drafts = None
        if drafted and ok:
            drafts = self._full_drafts(len(batch.decodes), drafted, got)
        elif drafted:
            plain = set(drafted)
            batch.decodes = [
                dataclasses.replace(d, num_queries=1) if i in plain else d
                for i, d in enumerate(batch.decodes)
            ]
        if self.rank != 0:
            w.forward(batch, drafts)
            return None
        t1 = time.monotonic()
        verified = w.verify(batch, drafts)
        if feed is not None and ok:
            keep = [p.seq_id for p in batch.prefills] + [batch.decodes[i].seq_id for i in feed]
            self._pending.add({sid: verified.features[sid] for sid in keep})
        t2 = _sync(w.device)
        return TargetStepOut(verified.results, ok, t2 - t1, sending, received)

    def _forget(self, seq_ids: list[int]) -> None:
        self._pending.drop(seq_ids)

    def _full_drafts(self, n: int, drafted: list[int], got: Drafts) -> Drafts:
        """The drafted rows placed among all n decodes (the others are q = 1: no drafts)."""
        tokens = torch.full(
            (n, got.tokens.shape[1]), NO_DRAFT, dtype=torch.long, device=self.worker.device
        )
        tokens[drafted] = got.tokens
        probs: list[torch.Tensor | None] = [None] * n
        for j, i in enumerate(drafted):
            probs[i] = got.probs[j]
        return Drafts(tokens, probs)

    def _channel_broke(self, exc: Exception) -> bool:
        log.warning("drafter channel broke (%s); verifying this step without drafts", exc)
        self._close_channel()
        return False
