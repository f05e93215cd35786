"""What one round trip to another process costs on this machine, by transport, as a function of
how long the other side works before it answers: the floor under the Ray executor's per-step
overhead (an actor call per step, gloo messages for features and drafts).

Three transports, each a caller and a peer process on this host; the peer busy-waits `d` ms
(a step's compute), then answers:

- `pipe`: a `multiprocessing.Pipe` (one OS hop each way: the floor of any two-process design);
- `gloo`: `torch.distributed` send / recv of a 64-float tensor over gloo (the tensor channel's
  transport on CPU), a message each way;
- `ray`: a Ray actor call, submitted, then `ray.get` (what the executor does per step).

Per transport and `d`: the median and p90 of (round trip - d) and the median return leg (peer's
answer to the caller holding it: `time.perf_counter` is CLOCK_MONOTONIC, one clock for both
processes). Writes JSON.

    python3 bench/call_latency.py --out docs/bench/call_latency.json [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BUSY_MS = (0, 2, 5, 10, 20)


def busy(ms: float) -> float:
    """Spin `ms` milliseconds (a step's compute holds its core), then the time it ended."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return time.perf_counter()


def summary(trips: list[tuple[float, float, float]], ms: float) -> dict:
    """trips: (sent, answered, received) per call -> medians in ms."""
    over = sorted((r - s) * 1000 - ms for s, _, r in trips)
    back = [(r - a) * 1000 for _, a, r in trips]
    return {"busy_ms": ms, "overhead_ms_p50": statistics.median(over),
            "overhead_ms_p90": over[int(0.9 * (len(over) - 1))],
            "return_leg_ms_p50": statistics.median(back), "calls": len(trips)}


def sweep(calls: int, trip) -> list[dict]:
    """`trip(ms)` (one round trip to a peer that works `ms`, returning when it answered) `calls`
    times per busy time -> a summary row each."""
    rows = []
    for ms in BUSY_MS:
        trips = []
        for _ in range(calls):
            sent = time.perf_counter()
            answered = trip(ms)
            trips.append((sent, answered, time.perf_counter()))
        rows.append(summary(trips, ms))
    return rows


def _pipe_peer(conn) -> None:
    while (ms := conn.recv()) is not None:
        conn.send(busy(ms))


def measure_pipe(calls: int) -> list[dict]:
    ours, theirs = mp.Pipe()
    peer = mp.get_context("spawn").Process(target=_pipe_peer, args=(theirs,))
    peer.start()

    def trip(ms: float) -> float:
        ours.send(ms)
        return ours.recv()

    try:
        return sweep(calls, trip)
    finally:
        ours.send(None)
        peer.join()


def _gloo_peer(port: int, calls: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    msg = torch.zeros(64, dtype=torch.float64)  # float64: a perf_counter value stays exact
    for ms in BUSY_MS:
        for _ in range(calls):
            dist.recv(msg, 0)
            msg[0] = busy(ms)
            dist.send(msg, 0)
    dist.destroy_process_group()


def measure_gloo(calls: int) -> list[dict]:
    import socket

    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = mp.get_context("spawn").Process(target=_gloo_peer, args=(port, calls))
    peer.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    msg, back = torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)

    def trip(ms: float) -> float:  # the peer knows the busy times: it runs the same sweep
        dist.send(msg, 1)
        dist.recv(back, 1)
        return float(back[0])

    try:
        return sweep(calls, trip)
    finally:
        dist.destroy_process_group()
        peer.join()


def measure_ray(calls: int) -> list[dict]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        peer = ray.remote(num_cpus=0.5)(Peer).remote()
        ray.get(peer.busy.remote(0))
        return sweep(calls, lambda ms: ray.get(peer.busy.remote(ms)))
    finally:
        ray.shutdown()


class Peer:
    def busy(self, ms: float) -> float:
        return busy(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200,
                    help="round trips per transport and busy time")
    ap.add_argument("--out", help="write the JSON here (else print it)")
    a = ap.parse_args()
    out = {"calls": a.calls, "cpus": os.cpu_count(),
           "transports": {name: fn(a.calls) for name, fn in
                          (("pipe", measure_pipe), ("gloo", measure_gloo), ("ray", measure_ray))}}
    text = json.dumps(out, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    for name, rows in out["transports"].items():
        for r in rows:
            print(f"{name:5s} busy {r['busy_ms']:>4g} ms: round trip - busy "
                  f"{r['overhead_ms_p50']:.2f} ms (p90 {r['overhead_ms_p90']:.2f}), "
                  f"return leg {r['return_leg_ms_p50']:.2f} ms")


if __name__ == "__main__":
    main()
