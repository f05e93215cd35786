"""The per-step calls to the actors, as Ray compiled graphs instead of one actor call each.

An actor call per step costs a task submission, its argument's pickling into the object store,
and a `ray.wait` / `ray.get` round trip: about 1 ms per actor on this project's 2-core box, on
top of the two tensor messages of the step. A compiled graph (Ray's `experimental_compile`)
starts a loop in each actor once; a step then writes its argument into a shared-memory channel
the loops read, and reads their results from channels back (measured: 0.49 ms per step for two
actors, against 1.94 ms for two actor calls).

Two graphs, not one: the target shards' and the drafter's. A compiled graph fails as a whole
when one of its actors dies (every output raises), and a step must survive its drafter dying
(target rank 0 verifies without drafts); with the drafter in a graph of its own, only that graph
breaks, and the executor replaces it with the drafter. The shards fail together anyway: their
collectives lose a dead peer.

Actors keep answering ordinary actor calls while in a graph (the graph runs on a thread of its
own), which the executor uses to connect a restarted drafter's channel to target rank 0.

Off by default (`ClusterConfig.compiled_graph`): a graph's loops wait for their input by
spinning (an idle actor in a graph used 85 % of a core, 1 % outside one), and on this project's
2-core box the spinning took the CPU the steps need: drafter actor + 1 shard ran at 0.40x
in-process tok/s at concurrency 1 and 0.27x at 8, against 0.65x and 0.57x with actor calls, the
verify itself 1.5-2x slower (2026-12-02, `bench/ray_executor.py --step-calls both`, other jobs on
the box). It is for nodes with a core to spare per actor.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.dag import InputNode, MultiOutputNode

log = logging.getLogger(__name__)


class StepGraph:
    """`method(*args)` on every actor of `actors` (name -> handle) per `submit`, compiled once."""

    def __init__(self, actors: dict[str, Any], method: str, num_args: int):
        self.names = list(actors)
        with InputNode() as inp:
            nodes = [getattr(actor, method).bind(*(inp[i] for i in range(num_args)))
                     for actor in actors.values()]
            dag = MultiOutputNode(nodes)
        self._graph = dag.experimental_compile()
        self._ids = {actor._actor_id.hex(): name for name, actor in actors.items()}

    def submit(self, *args) -> dict:
        """Start one execution: its output refs (in actor order) -> actor name."""
        return dict(zip(self._graph.execute(*args), self.names, strict=True))

    def collect(self, refs: dict, deadline: float) -> tuple[dict, dict[str, Exception], list]:
        """(results, failures, still pending) by actor name of this graph's `refs` and any
        other graph's (the drafter's), as `launch.wait_named`: read in order, shards first (the
        drafter's output is only its spans), since a graph's outputs cannot be waited on
        together. A failure is filed under the actor that died, when the error names one."""
        outs, failed = {}, {}
        for ref, name in refs.items():
            try:
                outs[name] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayChannelTimeoutError:
                return outs, failed, sorted(n for n in refs.values()
                                            if n not in outs and n not in failed)
            except Exception as exc:
                failed[self.dead_actor(exc) or name] = exc
                if name != "drafter":  # the shard group is lost: the rest fail with it
                    return outs, failed, []
        return outs, failed, []

    def dead_actor(self, exc: Exception) -> str | None:
        """The name of the actor `exc` says died, if it is one of this graph's: a dead actor
        fails every output of the graph, so the output that raised does not name it."""
        actor_id = getattr(exc, "actor_id", None)
        return self._ids.get(actor_id) if isinstance(actor_id, str) else None

    def close(self) -> None:
        """Stop the actors' loops (quick once a member is dead or killed: call it after)."""
        try:
            self._graph.teardown()
        except Exception:  # a dead member can make the teardown complain; the loops are gone
            log.debug("compiled step graph teardown failed", exc_info=True)
