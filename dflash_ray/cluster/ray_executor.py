"""`RayExecutor`: the `LocalExecutor` interface over a drafter actor and N target shard actors.

Owns placement (one placement group: a drafter bundle, then one bundle per shard), start-up with
a deadline, the per-step fan-out (one message per actor over its step connection, or one actor
call, or a compiled graph: `ClusterConfig.step_calls`; issued together, waited on together) and
recovery. The step itself is the workers' (`worker.step`); this class only decides where they
live and how their tensors travel:

- the drafter dies: the step still completes (target rank 0 verifies without drafts) and says
  the drafter was lost, so the engine decodes every sequence alive then plain to its end; a new
  drafter starts in the background, and sequences admitted once it is connected speculate
  again (`drafter_ready`). Steps that decode plain (a batch above `spec_max_batch`) never call
  the drafter, so `drafter_ready` also probes it, and a death it finds is reported by the next
  step as if that step had lost it;
- a target shard dies or a step passes `step_timeout_s`: the step raises (the engine fails the
  live requests with it), every actor is torn down, and the next step rebuilds the whole group.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import ray
from ray.util.placement_group import remove_placement_group

from ..core.step_io import ExecutorInfo, StepBatch, StepResult, WorkersLost
from ..models.hf_config import TargetConfig
from ..worker.caches import plan_cache
from ..worker.worker_config import ModelSpec, WorkerConfig
from .actors import DrafterActor, TargetShardActor
from .cluster_config import ClusterConfig
from .launch import (
    ActorStartError,
    Deadline,
    cause,
    enclosing_group,
    place,
    spawn,
    wait_all,
    wait_named,
)
from .step_feed import ActorGone, Feeds
from .step_graph import StepGraph
from .timing import StepTiming, restart_account

log = logging.getLogger(__name__)

MAX_DRAFTER_RESTARTS = 3  # in a row without a successful start; then decoding stays plain
DRAFTER_PROBE_S = 1.0  # at most one liveness probe of the connected drafter per this many seconds


class StepError(WorkersLost):
    """A target shard failed or a step timed out; the executor rebuilds on its next call."""


class RayExecutor:
    def __init__(self, cfg: WorkerConfig, num_target_shards: int = 1, **options):
        """`options`: any other `ClusterConfig` field."""
        self.wcfg = cfg
        self.cfg = ClusterConfig(num_target_shards=num_target_shards, **options)
        self.spec = ModelSpec.resolve(cfg)  # bad configs fail here, before any actor starts
        self.plan = self.cfg.sharding(TargetConfig.load(cfg.target))
        self.backend = self.cfg.backend(cfg.device)
        self.on_gpu = cfg.device.startswith("cuda")
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
        self._probe = None  # (drafter, ping ref) of the liveness probe in flight
        self._probe_sent = 0.0
        self._lost_unreported = False  # a probe found the drafter dead; the next step says so
        self._restart_asked = 0.0
        self.last_restart: dict | None = None  # restart_account of the last drafter restart
        self._broken = False
        self._info: ExecutorInfo | None = None
        self._shard_graph: StepGraph | None = None  # step_calls compiled_graph (step_graph.py)
        self._drafter_graph: StepGraph | None = None
        # step_calls connections (step_feed.py): one per actor, keyed by its name
        self._feeds = Feeds(os.urandom(32)) if self.cfg.step_calls == "connections" else None
        self._start_all()

    # ---- the executor interface -----------------------------------------------------------

    def info(self) -> ExecutorInfo:
        return self._info

    def drafter_ready(self) -> bool:
        """Asked at the start of every engine step: rebuilds a broken shard group first (so a
        rebuilt drafter serves the step's new requests), probes the connected drafter, and
        connects a restarted drafter once it is up."""
        if self._broken:
            self._start_all()
        self._probe_drafter()
        self._poll_drafter()
        return self._drafter is not None

    def execute(self, batch: StepBatch) -> StepResult:
        if self._broken:
            self._start_all()
        t0 = time.perf_counter()
        drafter = self._drafter
        drafting = drafter is not None and bool(batch.drafter_decodes())
        if self._feeds is not None:
            outs = self._step_over_feeds(batch, drafter is not None, drafting)
        else:
            outs = self._step_over_calls(batch, drafter, drafting)
        lead: StepResult = outs["target shard 0"]
        spans = lead.spans + outs.get("drafter", [])
        lost = lead.drafter_lost or (drafting and "drafter" not in outs) or self._lost_unreported
        self._lost_unreported = False
        if lost:
            self._lose_drafter(drafter, "its channel to target rank 0 broke")
        result = StepResult(lead.results, spans, drafter_lost=lost)
        t = self.timing
        t.steps += 1
        t.wall += time.perf_counter() - t0
        t.draft += result.draft_seconds
        t.verify += result.verify_seconds
        t.transfer += result.transfer_seconds
        return result

    def shutdown(self) -> None:
        self._teardown()

    @property
    def step_calls(self) -> str:
        """How steps reach the actors: `ClusterConfig.step_calls`."""
        return self.cfg.step_calls

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

    def _shard_names(self) -> list[str]:
        return [f"target shard {r}" for r in range(len(self._shards))]

    def _step_over_feeds(self, batch: StepBatch, connected: bool, drafting: bool) -> dict:
        deadline = time.monotonic() + self.cfg.step_timeout_s
        shards = self._shard_names()
        sent, failed = self._feeds.submit(shards, batch, connected)
        if failed:  # a shard is gone: its peers wait in their collectives for it, do not wait
            return self._settle({}, failed, [])
        if drafting:
            to_drafter, lost = self._feeds.submit(["drafter"], batch)
            sent, failed = sent + to_drafter, failed | lost
        outs, late, pending = self._feeds.collect(sent, deadline, frozenset(shards))
        return self._settle(outs, failed | late, pending)

    def _step_over_calls(self, batch: StepBatch, drafter, drafting: bool) -> dict:
        if self._shard_graph is not None:
            refs = self._shard_graph.submit(batch, drafter is not None)
        else:
            refs = {shard.step.remote(batch, drafter is not None): name
                    for shard, name in zip(self._shards, self._shard_names(), strict=True)}
        if drafting:
            if self._drafter_graph is not None:
                try:
                    refs |= self._drafter_graph.submit(batch)
                except ray.exceptions.RayChannelError as exc:  # the graph died with its actor
                    self._lose_drafter(drafter, f"its step graph broke: {cause(exc)}")
            else:
                refs[drafter.step.remote(batch)] = "drafter"
        deadline = time.monotonic() + self.cfg.step_timeout_s
        if self._shard_graph is not None:
            return self._settle(*self._shard_graph.collect(refs, deadline))
        return self._settle(*wait_named(refs, deadline, frozenset(self._shard_names())))

    def _settle(self, outs: dict, failed: dict[str, Exception], pending: list[str]) -> dict:
        """Every actor's result by name. A failed drafter is replaced (the target side falls back
        by itself); a failed shard or the deadline fails the step and marks a rebuild, naming
        the actor that died first."""
        shards = {n: e for n, e in failed.items() if n != "drafter"}
        if shards:
            dead_first = sorted(
                shards, key=lambda n: not isinstance(shards[n], ray.exceptions.RayActorError
                                                     | ActorGone))
            self._fail("; ".join(f"{n} failed: {cause(shards[n])}" for n in dead_first),
                       shards[dead_first[0]])
        if pending == ["drafter"]:  # the shards answered: target rank 0 got its drafts or not
            failed["drafter"] = TimeoutError(
                f"no answer within the {self.cfg.step_timeout_s:g} s step timeout")
        elif pending:
            self._fail(f"step timed out after {self.cfg.step_timeout_s:g} s waiting for {pending}")
        if "drafter" in failed:
            self._lose_drafter(self._drafter, f"it failed: {cause(failed['drafter'])}")
        return outs

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
        self._close_drafter_graph()
        if self._feeds is not None:
            self._feeds.drop("drafter")
        self._drafter = None
        self._start_drafter()

    def _probe_drafter(self) -> None:
        """Notice a dead drafter while no step calls it: one cheap call in flight at a time,
        sent at most every DRAFTER_PROBE_S and checked without waiting (a live drafter answers
        after the step it is running; a dead one's call fails at once)."""
        drafter = self._drafter
        if self._probe is not None:
            probed, ref = self._probe
            if probed is not drafter:  # replaced since: the answer says nothing now
                self._probe = None
            elif not ray.wait([ref], timeout=0)[0]:
                return
            else:
                self._probe = None
                try:
                    ray.get(ref)
                except Exception as exc:
                    self._lose_drafter(drafter, f"a liveness probe failed: {cause(exc)}")
                    self._lost_unreported = True
                    return
        if drafter is not None and time.monotonic() - self._probe_sent >= DRAFTER_PROBE_S:
            self._probe_sent = time.monotonic()
            self._probe = (drafter, drafter.ping.remote())

    def _start_drafter(self) -> None:
        self._restart_asked = time.time()
        actor = self._actor(DrafterActor, 0, self.wcfg)
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
            started = ray.get(ready)
            seen = time.time()
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
        self._lost_unreported = False  # no step ran since: no live sequence followed the old one
        self._drafter = actor
        self._drafter_graph = self._graph({"drafter": actor}, 1)
        self.last_restart = restart_account(self._restart_asked, started["timing"], seen,
                                            time.time())
        log.warning("drafter actor restarted in %.1f s (process start and imports %.1f s, "
                    "model load %.1f s, until a step saw it ready %.1f s, channel %.1f s); new "
                    "requests speculate again", *self.last_restart.values())

    def _connect_drafter(self, drafter, deadline: Deadline | None = None) -> None:
        """Cache, then the channel: target rank 0 and the drafter join it together."""
        deadline = deadline or Deadline(self.cfg.start_timeout_s)
        self._generation += 1
        name = f"dflash-{self._uid}-channel{self._generation}"
        wait_all(
            {
                drafter.allocate.remote(self._info.num_kv_blocks): "drafter",
                drafter.connect_channel.remote(name, self.backend): "drafter",
                self._shards[0].connect_channel.remote(name, self.backend): "target shard 0",
            },
            "connect the drafter channel",
            deadline,
        )
        self._open_feeds({"drafter": drafter}, deadline)

    def _open_feeds(self, actors: dict, deadline: Deadline) -> None:
        """With step_calls connections: each of `actors` (name -> handle) starts its step loop
        and the executor connects to it."""
        if self._feeds is None:
            return
        key = self._feeds.authkey
        refs = {actor.open_feed.remote(key): name for name, actor in actors.items()}
        for name, address in zip(refs.values(), wait_all(refs, "open its step connection",
                                                         deadline), strict=True):
            try:
                self._feeds.connect(name, tuple(address), deadline.left())
            except Exception as exc:
                raise ActorStartError(f"{name} failed to open its step connection: "
                                      f"{exc}") from exc

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
        has_drafter = self.wcfg.drafter is not None
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
                self._actor(TargetShardActor, first + r, self.wcfg, r, self.plan)
                for r in range(n)
            ]
            drafter = self._actor(DrafterActor, 0, self.wcfg) if has_drafter else None
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
            if self._info is None:  # the first start sizes the caches; rebuilds keep the sizes
                self._info = self._size(started)
            info = self._info
            allocs = {
                s.allocate.remote(info.num_kv_blocks, info.num_slots): f"target shard {r}"
                for r, s in enumerate(self._shards)
            }
            wait_all(allocs, "allocate the KV cache", deadline)
            self._open_feeds(dict(zip(self._shard_names(), self._shards, strict=True)), deadline)
            if drafter is not None:
                self._connect_drafter(drafter, deadline)
            # shards step(batch, drafter_connected), the drafter step(batch)
            self._shard_graph = self._graph(
                {f"target shard {r}": s for r, s in enumerate(self._shards)}, 2)
            if drafter is not None:
                self._drafter_graph = self._graph({"drafter": drafter}, 1)
        except BaseException:
            self._teardown()
            raise
        self._drafter = drafter
        self._broken = False

    def _graph(self, actors: dict, num_args: int) -> StepGraph | None:
        """The actors' step as a compiled graph (step_calls `compiled_graph`), or None."""
        return (StepGraph(actors, "step", num_args) if self.cfg.step_calls == "compiled_graph"
                else None)

    def _close_drafter_graph(self) -> None:
        if self._drafter_graph is not None:
            self._drafter_graph.close()
            self._drafter_graph = None

    def _size(self, started: list[dict]) -> ExecutorInfo:
        """KV blocks and state slots that every actor's cache budget holds (each actor has a
        device of its own; blocks are shared ids, so the smallest budget decides; a shard
        without attention keeps no KV and bounds nothing)."""
        c = self.wcfg
        plans = [plan_cache(s["cache_budget"], s["kv_bytes_per_token"], s["state_bytes_per_seq"],
                            c.kv_block_len, c.max_num_seqs) for s in started]
        blocks = c.num_kv_blocks or min(b for b, _ in plans if b is not None)
        slots = min(s for _, s in plans)
        per_token = sum(s["kv_bytes_per_token"] for s in started)
        per_seq = sum(s["state_bytes_per_seq"] for s in started)
        return self.spec.info(c, blocks, slots, per_token, per_seq)

    def _teardown(self) -> None:
        if self._feeds is not None:
            self._feeds.close()  # the actors' loops end; their processes end with the kills
        actors = list(self._shards) + [self._drafter] + [self._starting and self._starting[0]]
        for actor in actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        for graph in (self._shard_graph, self._drafter_graph):  # after the kills: quick then
            if graph is not None:
                graph.close()
        self._shard_graph = self._drafter_graph = None
        if self._pg is not None and self._pg_owned:
            remove_placement_group(self._pg)
        self._pg, self._shards, self._drafter, self._starting = None, [], None, None
        self._probe, self._lost_unreported = None, False
