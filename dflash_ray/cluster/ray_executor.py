"""`RayExecutor`: the `LocalExecutor` interface over a drafter actor and N target shard actors.

Owns placement (one placement group: a drafter bundle, then one bundle per shard), start-up with
a deadline, the per-step fan-out (one call per actor, issued together, waited on together) and
recovery:

- the drafter dies: the step still completes (target rank 0 verifies the drafted rows as plain
  decodes); every sequence alive then continues with plain decoding to its end, a new drafter
  starts in the background, and sequences prefilled once it is connected speculate again;
- a target shard dies or a step passes `step_timeout_s`: the step raises (the engine fails the
  live requests with it), every actor is torn down, and the next step rebuilds the whole group.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import remove_placement_group

from ..core.step_io import StepBatch, StepResult
from ..models.hf_config import TargetConfig
from ..worker.worker_config import ModelSpec, RunnerConfig
from .actors import DrafterActor, TargetShardActor
from .cluster_config import ClusterConfig
from .launch import Deadline, cause, enclosing_group, place, spawn, wait_all

log = logging.getLogger(__name__)

MAX_DRAFTER_RESTARTS = 3  # in a row without a successful start; then decoding stays plain


class StepError(RuntimeError):
    """A target shard failed or a step timed out; the executor rebuilds on its next call."""


@dataclass(slots=True)
class StepTiming:
    """Seconds summed over steps. The drafter and the target run one after the other (the
    target waits for the drafts), so wall = draft + transfer + verify + ray_overhead. The
    transfer split needs the actors on one node (one monotonic clock; STRICT_PACK)."""

    steps: int = 0
    wall: float = 0.0  # execute() as the engine sees it
    draft: float = 0.0
    verify: float = 0.0
    transfer: float = 0.0  # features to the drafter + drafts back (the receiver already waits)

    @property
    def ray_overhead(self) -> float:
        """Actor-call dispatch, argument pickling, waiting for results, skew between actors."""
        return self.wall - self.draft - self.verify - self.transfer


class RayExecutor:
    def __init__(self, rc: RunnerConfig, num_target_shards: int = 1, **options):
        """`options`: any other `ClusterConfig` field."""
        self.rc = rc
        self.cfg = ClusterConfig(num_target_shards=num_target_shards, **options)
        self.spec = ModelSpec.resolve(rc)  # bad configs fail here, before any actor starts
        self.cfg.sharding(TargetConfig.load(rc.target))
        self.backend = self.cfg.backend(rc.device)
        self.on_gpu = rc.device.startswith("cuda")
        if not ray.is_initialized():
            ray.init()
        self._uid = uuid.uuid4().hex[:8]
        self._generation = 0
        self.timing = StepTiming()
        self._pg = None
        self._pg_offset, self._pg_owned = 0, True
        self._shards: list = []
        self._drafter = None  # connected drafter actor, or None while it is dead or starting
        self._starting = None  # (actor, ready ref, started at) of a drafter coming up
        self._drafter_failures = 0
        self._speculating: set[int] = set()  # prefilled while the current drafter was connected
        self._released_target: list[int] = []
        self._released_drafter: list[int] = []
        self._broken = False
        self.num_kv_blocks = rc.num_kv_blocks
        self.kv_bytes_per_token = 0
        self._start_all()

    # ---- the executor interface -----------------------------------------------------------

    def info(self) -> dict:
        return self.spec.info(self.num_kv_blocks, self.rc.kv_block_len, self.kv_bytes_per_token)

    def release(self, seq_ids: list[int]) -> None:
        """Queued; it rides along with the next step's calls (no extra Ray call)."""
        self._speculating.difference_update(seq_ids)
        self._released_target += seq_ids
        if self._drafter is not None:
            self._released_drafter += seq_ids

    def execute(self, batch: StepBatch) -> StepResult:
        if self._broken:
            self._start_all()
        self._poll_drafter()
        t0 = time.perf_counter()
        target_batch, draft_batch, drafted, feed = self._split(batch)
        refs = {}
        for rank, shard in enumerate(self._shards):
            released = self._released_target if rank == 0 else []
            ref = shard.step.remote(target_batch, drafted, feed, released)
            refs[ref] = f"target shard {rank}"
        self._released_target = []
        drafter = self._drafter
        if draft_batch is not None:
            refs[drafter.step.remote(draft_batch, self._released_drafter)] = "drafter"
            self._released_drafter = []
        outs = self._collect(refs)
        lead = outs["target shard 0"]
        d_out = outs.get("drafter")
        if draft_batch is not None and (d_out is None or not lead.channel_ok):
            self._lose_drafter(drafter, "its channel to target rank 0 broke")
        draft_s = self._account(time.perf_counter() - t0, lead, d_out)
        return StepResult(lead.results, draft_seconds=draft_s, verify_seconds=lead.verify_seconds)

    def _account(self, wall: float, lead, d_out) -> float:
        """Add one step to `timing`; returns its draft seconds. A transfer counts from the
        later of (sender starts, receiver waits) to its arrival; the rest of the wait on the
        other side is Ray's (calls reaching the actors at different times)."""
        t = self.timing
        t.steps += 1
        t.wall += wall
        t.verify += lead.verify_seconds
        if d_out is None or not lead.received:
            return 0.0
        draft_s = d_out.drafted - d_out.received
        t.draft += draft_s
        features = d_out.received - max(d_out.posted, lead.sending)
        drafts = lead.received - d_out.drafted
        t.transfer += max(0.0, features) + max(0.0, drafts)
        return draft_s

    def shutdown(self) -> None:
        self._teardown()

    def actors(self) -> dict:
        """Live actor handles by name ("drafter", "target shard 0", ...), for operators and
        failure drills."""
        named = {f"target shard {r}": s for r, s in enumerate(self._shards)}
        if self._drafter is not None:
            named["drafter"] = self._drafter
        return named

    def wait_for_drafter(self, timeout_s: float) -> bool:
        """Block until a restarted drafter is connected (True) or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while self._starting is not None and time.monotonic() < deadline:
            ray.wait([self._starting[1]], timeout=max(0.0, deadline - time.monotonic()))
            self._poll_drafter()
        return self._drafter is not None

    # ---- one step ---------------------------------------------------------------------------

    def _split(
        self, batch: StepBatch
    ) -> tuple[StepBatch, StepBatch | None, list[int], list[int] | None]:
        """(target batch, drafter batch or None, indices of the decodes the drafter takes,
        indices of the decodes whose features it needs or None). Sequences admitted while no
        drafter was connected go to the target as plain blocks (q = 1): the drafter has no
        context for them. A step without a drafter pass (`StepBatch.drafter_pass`) leaves their
        features waiting on target rank 0."""
        self._speculating.difference_update(batch.dropped)
        if self._drafter is None:
            plain = [
                d if d.num_queries == 1 else dataclasses.replace(d, num_queries=1)
                for d in batch.decodes
            ]
            return StepBatch(batch.prefills, plain, batch.dropped), None, [], None
        self._speculating.update(p.seq_id for p in batch.prefills)
        feed = [i for i, d in enumerate(batch.decodes) if d.seq_id in self._speculating]
        decodes = [
            d if d.seq_id in self._speculating else dataclasses.replace(d, num_queries=1)
            for d in batch.decodes
        ]
        target_batch = StepBatch(batch.prefills, decodes, batch.dropped)
        if not feed or not batch.drafter_pass:
            return target_batch, None, [], feed
        draft_batch = StepBatch([], [batch.decodes[i] for i in feed])
        return target_batch, draft_batch, feed, feed

    def _collect(self, refs: dict) -> dict:
        """Every actor's result by name. A failed drafter is replaced (the target side falls back
        by itself); a failed shard or the deadline fails the step and marks a rebuild."""
        deadline = time.monotonic() + self.cfg.step_timeout_s
        pending, outs = dict(refs), {}
        while pending:
            ready, _ = ray.wait(
                list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic())
            )
            if not ready:
                names = sorted(pending.values())
                self._fail(
                    f"step timed out after {self.cfg.step_timeout_s:g} s waiting for {names}"
                )
            name = pending.pop(ready[0])
            try:
                outs[name] = ray.get(ready[0])
            except Exception as exc:
                if name != "drafter":
                    self._fail_shards(name, exc, pending)
                self._lose_drafter(self._drafter, f"it failed: {cause(exc)}")
        return outs

    def _fail_shards(self, name: str, exc: Exception, pending: dict) -> None:
        """One shard failed: its peers fail within moments (their collectives lose it), so
        gather those too and name the actor that died first in the message."""
        failed = {name: exc}
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as other:
                failed[pending[ref]] = other
        dead_first = sorted(
            failed, key=lambda n: not isinstance(failed[n], ray.exceptions.RayActorError)
        )
        self._fail("; ".join(f"{n} failed: {cause(failed[n])}" for n in dead_first), exc)

    def _fail(self, why: str, cause: Exception | None = None) -> None:
        self._teardown()
        self._broken = True
        raise StepError(
            f"{why}; the target shard group is torn down and rebuilt on the next step"
        ) from cause

    # ---- drafter loss and restart ----------------------------------------------------------

    def _lose_drafter(self, drafter, why: str) -> None:
        if drafter is None or drafter is not self._drafter:
            return
        log.warning(
            "drafter actor lost (%s): live requests continue with plain decoding; starting a "
            "new drafter",
            why,
        )
        ray.kill(drafter, no_restart=True)
        self._drafter = None
        self._speculating.clear()
        self._released_drafter = []
        self._start_drafter()

    def _start_drafter(self) -> None:
        actor = self._actor(DrafterActor, 0, self.rc)
        self._starting = (actor, actor.ready.remote(), time.monotonic())

    def _poll_drafter(self) -> None:
        """Connect a restarted drafter once it is ready (never waits for it to load)."""
        if self._starting is None:
            return
        actor, ready, since = self._starting
        done, _ = ray.wait([ready], timeout=0)
        if not done and time.monotonic() - since < self.cfg.start_timeout_s:
            return
        self._starting = None
        try:
            if not done:
                raise TimeoutError(f"not ready within {self.cfg.start_timeout_s:g} s")
            ray.get(ready)
            self._connect_drafter(actor)
        except Exception as exc:
            ray.kill(actor, no_restart=True)
            self._drafter_failures += 1
            if self._drafter_failures >= MAX_DRAFTER_RESTARTS:
                log.error(
                    "drafter failed to restart %d times (%s); decoding stays plain",
                    self._drafter_failures,
                    exc,
                )
                return
            log.warning("drafter restart failed (%s); trying again", exc)
            self._start_drafter()
            return
        self._drafter_failures = 0
        self._drafter = actor
        log.warning("drafter actor restarted; new requests speculate again")

    def _connect_drafter(self, drafter, deadline: Deadline | None = None) -> None:
        """Cache, then the channel: target rank 0 and the drafter join it together."""
        deadline = deadline or Deadline(self.cfg.start_timeout_s)
        self._generation += 1
        name = f"dflash-{self._uid}-channel{self._generation}"
        wait_all(
            {
                drafter.allocate.remote(self.num_kv_blocks): "drafter",
                drafter.connect_channel.remote(name, self.backend): "drafter",
                self._shards[0].connect_channel.remote(name, self.backend): "target shard 0",
            },
            "connect the drafter channel",
            deadline,
        )

    # ---- start-up and teardown -------------------------------------------------------------

    def _actor(self, cls, bundle: int, *args):
        return spawn(cls, self._pg, self._pg_offset + bundle, self._bundle(), *args)

    def _bundle(self) -> dict:
        bundle = {"CPU": self.cfg.num_cpus_per_actor}
        if self.on_gpu:
            bundle["GPU"] = self.cfg.num_gpus_per_actor
        return bundle

    def _start_all(self) -> None:
        """Placement group, actors, shard group, KV caches, drafter channel; raises
        ActorStartError (after tearing down what started) naming what did not come up."""
        self._teardown()
        self._generation += 1
        deadline = Deadline(self.cfg.start_timeout_s)
        has_drafter = self.rc.drafter is not None
        n = self.cfg.num_target_shards
        first = 1 if has_drafter else 0  # bundle 0 is the drafter's, then one per shard
        bundles = [self._bundle() for _ in range(first + n)]
        # Inside a Serve replica's placement group (placement_group_bundles in the YAML) the
        # actors take bundles 1..; otherwise the executor places (and later removes) its own.
        enclosing = enclosing_group(len(bundles))
        self._pg_offset, self._pg_owned = (1, False) if enclosing else (0, True)
        self._pg = enclosing or place(bundles, self.cfg.placement_strategy, deadline)
        try:  # on failure, removing the placement group also ends the actors started in it
            self._shards = [
                self._actor(TargetShardActor, first + r, self.rc, r, n) for r in range(n)
            ]
            drafter = self._actor(DrafterActor, 0, self.rc) if has_drafter else None
            names = {s.ready.remote(): f"target shard {r}" for r, s in enumerate(self._shards)}
            if drafter is not None:
                names[drafter.ready.remote()] = "drafter"
            started = wait_all(names, "start", deadline)
            if n > 1:
                timeout = self.cfg.collective_timeout_s
                lead = self._shards[0].open_store.remote(timeout)
                host, port = wait_all({lead: "target shard 0"}, "start", deadline)[0]
                wait_all(
                    {
                        s.join_group.remote(host, port, self.backend, timeout): f"target shard {r}"
                        for r, s in enumerate(self._shards)
                    },
                    "form the target shard group",
                    deadline,
                )
            if self.num_kv_blocks is None:
                self.num_kv_blocks = min(s["kv_blocks_fit"] for s in started)
            self.kv_bytes_per_token = sum(s["kv_bytes_per_token"] for s in started)
            allocs = {
                s.allocate.remote(self.num_kv_blocks): f"target shard {r}"
                for r, s in enumerate(self._shards)
            }
            wait_all(allocs, "allocate the KV cache", deadline)
            if drafter is not None:
                self._connect_drafter(drafter, deadline)
        except BaseException:
            self._teardown()
            raise
        self._drafter = drafter
        self._broken = False

    def _teardown(self) -> None:
        actors = list(self._shards) + [self._drafter] + [self._starting and self._starting[0]]
        for actor in actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if self._pg is not None and self._pg_owned:
            remove_placement_group(self._pg)
        self._pg, self._shards, self._drafter, self._starting = None, [], None, None
        self._speculating.clear()
        self._released_target, self._released_drafter = [], []
