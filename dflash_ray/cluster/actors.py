"""The actors of the Ray executor: one drafter, N target shards. Plain classes (the executor wraps
them with `ray.remote` and its placement options); each method is one RPC, and `step` is the only
one called per engine step: by an actor call, a compiled graph, or the actor's own loop reading
its step connection (`open_feed`, cluster/step_feed.py).

Neither actor has a step of its own: a target shard runs `worker.step.target_step`, the same
function the in-process executor runs, with the drafter reached through the tensor channel
(`ChannelDrafter`) instead of called directly; the drafter actor runs `DraftWorker.draft`
between receiving the features and sending the drafts. When the channel breaks (the drafter
died) `target_step` verifies without drafts, so the step still commits correct tokens, and says
so in its result.
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch

from ..core.step_io import Span, StepBatch, StepResult
from ..models.hf_config import TargetConfig
from ..models.sharding import ShardingConfig
from ..parallel.communicator import LOCAL, GroupCommunicator, connect_store, open_store
from ..worker.draft_worker import DraftWorker
from ..worker.drafts import Drafts
from ..worker.step import DrafterLost, target_step
from ..worker.target_worker import TargetWorker
from ..worker.trace import tracing
from ..worker.worker_config import ModelSpec, WorkerConfig
from .channel import (
    DRAFTER_RANK,
    TARGET_RANK,
    Channel,
    recv_drafts,
    recv_features,
    send_drafts,
    send_features,
)
from .launch import node_ip
from .step_feed import serve

log = logging.getLogger(__name__)
IMPORTED_AT = time.time()  # this actor process has started and imported torch and the package


def _started(cfg: WorkerConfig, per_token: int, per_seq: int = 0) -> dict:
    return {
        "cache_budget": cfg.cache_budget(),
        "kv_bytes_per_token": per_token,
        "state_bytes_per_seq": per_seq,
        "pid": os.getpid(),
        "gpu_ids": ray.get_gpu_ids(),
    }


def open_feed(actor, authkey: bytes) -> tuple[str, int]:
    """Serve `actor.step` over a connection of its own (`step_feed`); returns its address. The
    loop's thread makes the worker's GPU its current device (a thread's own setting)."""
    device = actor.worker.device
    on_start = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
    return serve(actor.step, node_ip(), authkey, on_start)


class DrafterActor:
    def __init__(self, cfg: WorkerConfig):
        constructed = time.time()
        self.cfg, self.spec = cfg, ModelSpec.resolve(cfg)
        self.worker = DraftWorker(cfg, self.spec)
        self.channel: Channel | None = None
        # wall-clock times of its start-up, for the executor's account of a restart
        self.timing = {"imported": IMPORTED_AT, "constructed": constructed,
                       "loaded": time.time()}

    def ready(self) -> dict:
        return {**_started(self.cfg, self.worker.kv_bytes_per_token()), "timing": self.timing}

    def ping(self) -> None:
        """The executor's liveness probe (steps that decode plain never call the drafter)."""

    def allocate(self, num_blocks: int) -> None:
        self.worker.allocate(num_blocks)

    def connect_channel(self, name: str, backend: str) -> None:
        self.channel = Channel(name, DRAFTER_RANK, backend, self.worker.device)

    def open_feed(self, authkey: bytes) -> tuple[str, int]:
        return open_feed(self, authkey)

    def step(self, batch: StepBatch) -> list[Span]:
        """Take in the features, draft, send the drafts; returns the step's spans here."""
        with tracing() as spans:
            try:
                # features cross in the target's dtype; the drafter casts them to its own
                features = recv_features(self.channel, batch, self.spec.feature_dim,
                                         self.cfg.torch_dtype)
                drafts = self.worker.draft(batch, features)
                send_drafts(self.channel, batch, drafts, self.spec.vocab_size)
            except BaseException:
                # Close the channel so target rank 0 fails its transfer now instead of waiting.
                if self.channel is not None:
                    self.channel.close()
                    self.channel = None
                raise
        return spans


class ChannelDrafter:
    """Target rank 0's source of drafts under Ray: the features go to the drafter actor over
    the channel and the drafts come back. A broken channel is `DrafterLost`."""

    def __init__(self, shard: TargetShardActor):
        self.shard = shard

    def draft(self, batch: StepBatch, features: torch.Tensor) -> Drafts:
        channel = self.shard.channel
        if channel is None:
            raise DrafterLost("no drafter channel")
        spec = self.shard.spec
        try:
            send_features(channel, features)
            return recv_drafts(channel, batch, spec.block_size - 1, spec.vocab_size)
        except Exception as exc:
            log.warning("drafter channel broke (%s); verifying this step without drafts", exc)
            self.shard.close_channel()
            raise DrafterLost(str(exc)) from exc


class TargetShardActor:
    def __init__(self, cfg: WorkerConfig, rank: int, plan: ShardingConfig):
        self.cfg, self.spec = cfg, ModelSpec.resolve(cfg)
        self.rank = rank
        shard = None
        self.comm = LOCAL
        if plan.ep_size > 1:
            shard = plan.shard(TargetConfig.load(cfg.target), rank)
            self.comm = GroupCommunicator(rank, plan.ep_size)
        self.worker = TargetWorker(cfg, self.spec, shard, self.comm)
        self.channel: Channel | None = None
        self.drafter = ChannelDrafter(self) if rank == 0 else None
        self._store = None

    def ready(self) -> dict:
        w = self.worker
        return _started(self.cfg, w.kv_bytes_per_token(), w.state_bytes_per_seq())

    def open_store(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0 serves the shard group's rendezvous; returns its address."""
        host = node_ip()
        self._store, port = open_store(host, timeout_s)
        return host, port

    def join_group(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        store = self._store or connect_store(host, port, timeout_s)
        self.comm.connect(backend, store, "shards", timeout_s, self.worker.device)

    def allocate(self, num_blocks: int, num_slots: int | None = None) -> None:
        self.worker.allocate(num_blocks, num_slots)

    def open_feed(self, authkey: bytes) -> tuple[str, int]:
        return open_feed(self, authkey)

    def connect_channel(self, name: str, backend: str) -> None:
        self.close_channel()
        self.channel = Channel(name, TARGET_RANK, backend, self.worker.device)

    def close_channel(self) -> None:
        if self.channel is not None:
            try:
                self.channel.close()
            except Exception:  # a dead peer can make teardown complain; the group is gone anyway
                log.warning("closing drafter channel %s failed", self.channel.name, exc_info=True)
            self.channel = None

    def step(self, batch: StepBatch, drafter_connected: bool) -> StepResult | None:
        """One step of this shard; rank 0 returns the result. `drafter_connected`: False once
        the executor has given the drafter up (its channel is closed here)."""
        if not drafter_connected:
            self.close_channel()
        result = target_step(self.worker, batch, self.drafter)
        return result if self.rank == 0 else None
