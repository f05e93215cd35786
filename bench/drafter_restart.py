"""How long the Ray executor runs without its drafter after the drafter actor dies, under load,
and where the seconds go: the shipped pair, a drafter actor + 1 target shard, `--concurrency`
requests kept in flight; the drafter is killed once every level is warm, and the engine steps on
(plain) until a new drafter is connected.

    python3 bench/drafter_restart.py [--concurrency 2 8] [--spec-profile device] [--out FILE]

`--spec-profile device` (the default, what `serve run deployments/dflash.yaml` gets on a CPU)
decodes plain above 2 running requests, so at concurrency 8 no step calls the drafter: only the
executor's liveness probe sees it die. `whole_block` speculates at every concurrency.

Prints per level the seconds from the kill to the restart and its parts (`RayExecutor.
last_restart`: process start and imports, model load, until a step saw it ready, channel).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray  # noqa: E402

from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402


def measure(engine, prompts: list, concurrency: int, timeout_s: float = 300) -> dict:
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    queue, live = list(prompts) * 50, 0

    def step() -> None:
        nonlocal live
        while live < concurrency:
            engine.add_request(queue.pop(), params)
            live += 1
        live -= sum(out.finished for out in engine.step())

    for _ in range(20):  # warm: every request in flight, speculating
        step()
    ex = engine.executor
    drafter = ex.actors()["drafter"]
    killed = time.monotonic()
    ray.kill(drafter)
    steps = 0
    while time.monotonic() - killed < timeout_s:
        step()
        steps += 1
        if ex.last_restart is not None and ex.actors().get("drafter") is not None:
            break
    back = time.monotonic() - killed
    while live:  # drain
        live -= sum(out.finished for out in engine.step())
    return {"concurrency": concurrency, "kill_to_back_s": back, "plain_steps": steps,
            **(ex.last_restart or {})}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[2, 8])
    p.add_argument("--spec-profile", choices=["device", "whole_block"], default="device")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    target, drafter = demo_pair()
    rows = []
    try:
        for c in args.concurrency:
            engine = make_engine(EngineConfig(target=target, drafter=drafter, executor="ray",
                                              spec_profile=args.spec_profile,
                                              max_num_seqs=max(args.concurrency)))
            try:
                engine.executor.last_restart = None
                rows.append(measure(engine, bench_prompts(target, 16), c)
                            | {"spec_profile": args.spec_profile})
            finally:
                engine.shutdown()
            r = rows[-1]
            print(f"c={c}: drafter back {r['kill_to_back_s']:.1f} s after the kill "
                  f"({r['plain_steps']} plain steps); restart {r.get('total_s', 0):.1f} s = "
                  f"process+imports {r.get('process_and_imports_s', 0):.1f} + load "
                  f"{r.get('load_s', 0):.1f} + until seen {r.get('until_seen_s', 0):.1f} + "
                  f"channel {r.get('connect_s', 0):.1f}")
    finally:
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
