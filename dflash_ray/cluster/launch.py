"""Starting actors with a deadline: the placement group, actor creation in its bundles, and
waiting on start-up calls so that a failure or a timeout names the actor and the cause."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ActorStartError(RuntimeError):
    """An actor (or the placement group) did not come up; the message says which and why."""


@dataclass(slots=True)
class Deadline:
    seconds: float
    at: float = field(init=False)

    def __post_init__(self) -> None:
        self.at = time.monotonic() + self.seconds

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())


def cause(exc: Exception) -> str:
    """One line for an actor's failure: the original exception of a failed task, or the last
    line of Ray's report (an actor that died in its constructor, was killed, ran out of memory);
    the full report stays chained to the raised error."""
    original = getattr(exc, "cause", None)
    if isinstance(original, Exception):
        return f"{type(original).__name__}: {original}"
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    return next((ln for ln in reversed(lines) if ln), type(exc).__name__)


def enclosing_group(num_bundles: int) -> PlacementGroup | None:
    """The placement group this process runs in, when it has a bundle 0 for the caller (a Serve
    replica started with `placement_group_bundles`) plus `num_bundles` more for our actors."""
    current = ray.util.get_current_placement_group()
    if current is not None and len(current.bundle_specs) >= num_bundles + 1:
        return current
    return None


def place(bundles: list[dict], strategy: str, deadline: Deadline) -> PlacementGroup:
    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=deadline.left())
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ActorStartError(
            f"placement group (bundles {bundles}, strategy {strategy}) was not placed within "
            f"{deadline.seconds:g} s; available: {ray.available_resources()}. Lower "
            "num_cpus_per_actor / num_gpus_per_actor or num_target_shards, or relax "
            "placement_strategy"
        ) from None
    return pg


def spawn(cls, pg: PlacementGroup, bundle: int, resources: dict, *args):
    """An actor of plain class `cls` in bundle `bundle` of `pg`; it is never restarted by Ray
    (the executor decides what a lost actor means)."""
    return (
        ray.remote(cls)
        .options(
            num_cpus=resources.get("CPU", 0),
            num_gpus=resources.get("GPU", 0),
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=bundle
            ),
        )
        .remote(*args)
    )


def wait_all(names: dict, what: str, deadline: Deadline) -> list:
    """Results of the calls `names` (ref -> actor name) in order, failing on the first error
    or at the deadline with an ActorStartError that names the actor(s)."""
    pending, outs = dict(names), {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=deadline.left())
        if not ready:
            raise ActorStartError(
                f"{', '.join(sorted(set(pending.values())))} did not {what} within "
                f"{deadline.seconds:g} s (still loading, or stuck waiting for a peer)"
            )
        name = pending.pop(ready[0])
        try:
            outs[ready[0]] = ray.get(ready[0])
        except Exception as exc:
            raise ActorStartError(f"{name} failed to {what}: {cause(exc)}") from exc
    return [outs[r] for r in names]


def wait_named(refs: dict, deadline: float, critical: frozenset[str],
               grace_s: float = 1.0) -> tuple[dict, dict[str, Exception], list[str]]:
    """The calls `refs` (ref -> actor name) until `deadline` (time.monotonic()): (results,
    failures, still pending) by name, as `step_feed.Feeds.collect`. Once one of `critical` has
    failed the rest get at most `grace_s` more: the peers of a dead shard fail within moments
    (their collectives lose it)."""
    pending, outs, failed = dict(refs), {}, {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1,
                            timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        name = pending.pop(ready[0])
        try:
            outs[name] = ray.get(ready[0])
        except Exception as exc:
            failed[name] = exc
            if name in critical:
                deadline = min(deadline, time.monotonic() + grace_s)
    return outs, failed, sorted(pending.values())


def node_ip() -> str:
    """The address this process's sockets listen on for peers (the shard group's store, the
    step connections, the pushed streams): `DFLASH_NODE_IP` where set (the tests: 127.0.0.1),
    else Ray's address for this node."""
    return os.environ.get("DFLASH_NODE_IP") or ray.util.get_node_ip_address()
