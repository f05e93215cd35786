"""Does a step run slower after its process has paused? The Ray executor's target shard waits for
the round trip to the engine between steps (bench/call_latency.py: ~2.4 ms per actor call on the
2-core box) and its verify measured slower than the in-process engine's (12.4 vs 10.7 ms at
c = 8). This isolates the pause from everything else Ray adds: the same in-process engine (the
shipped pair, default settings, greedy, c = 8 closed loop, one torch thread) in a Ray actor, its
steps back to back, or each followed by a pause of `--pause-ms` spent asleep or spinning; and in
the driver, back to back or pausing asleep (the pause without Ray). Setups alternate round by
round. Reports per setup the mean verify time per step (the worker's own span, which never
includes the pause) and tok/s with the pause subtracted.

    python3 bench/step_pause.py --out docs/bench/step_pause.json [--rounds 3 --pause-ms 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                   "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(key, value)

import ray  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402

CONCURRENCY = 8


class PausedEngine:
    """An in-process engine whose executor pauses `pause_ms` after every step (asleep, or spinning
    with `spin`): the gap a remote shard sees between one step's return and the next call."""

    def __init__(self, requests: int, pause_ms: float = 0.0, spin: bool = False):
        torch.set_num_threads(1)
        target, drafter = demo_pair()
        self.engine = make_engine(EngineConfig(target=target, drafter=drafter,
                                               max_num_seqs=CONCURRENCY, num_kv_blocks=512))
        self.prompts = bench_prompts(target, requests)
        self.params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        self.pause_s = pause_ms / 1000
        if pause_ms:
            execute = self.engine.executor.execute

            def paused(batch):
                result = execute(batch)
                end = time.perf_counter() + self.pause_s
                if spin:
                    while time.perf_counter() < end:
                        pass
                else:
                    time.sleep(self.pause_s)
                return result

            self.engine.executor.execute = paused
        closed_loop(self.engine, self.prompts[:CONCURRENCY], CONCURRENCY, self.params,
                    tqdm(disable=True))

    def run(self) -> dict:
        s0 = self.engine.stats().counters
        row = closed_loop(self.engine, self.prompts, CONCURRENCY, self.params, tqdm(disable=True))
        s = self.engine.stats().counters
        steps = s.num_steps - s0.num_steps
        return {"verify_ms_per_step": 1000 * (s.verify_seconds - s0.verify_seconds) / steps,
                "tok_s_without_pause": row["tokens"] / (row["seconds"] - steps * self.pause_s),
                "steps": steps, "outputs": sorted(row["outputs"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause-ms", type=float, default=3.0)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--out", help="write the JSON here")
    a = ap.parse_args()
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        actor = ray.remote(num_cpus=1)(PausedEngine)
        setups = {
            "driver": PausedEngine(a.requests),
            f"driver, {a.pause_ms:g} ms asleep after each step": PausedEngine(a.requests,
                                                                              a.pause_ms),
            "actor": actor.remote(a.requests),
            f"actor, {a.pause_ms:g} ms asleep after each step": actor.remote(
                a.requests, a.pause_ms),
            f"actor, {a.pause_ms:g} ms spinning after each step": actor.remote(
                a.requests, a.pause_ms, True),
        }
        runs: dict[str, list[dict]] = {name: [] for name in setups}
        for r in range(a.rounds):
            names = list(setups)[:: 1 if r % 2 == 0 else -1]
            for name in names:
                s = setups[name]
                out = s.run() if isinstance(s, PausedEngine) else ray.get(s.run.remote())
                runs[name].append(out)
                print(f"round {r} {name:>34}: verify {out['verify_ms_per_step']:.2f} ms/step, "
                      f"{out['tok_s_without_pause']:.0f} tok/s without the pauses", flush=True)
        reference = runs["driver"][0]["outputs"]
        result = {"pause_ms": a.pause_ms, "rounds": a.rounds, "concurrency": CONCURRENCY,
                  "requests": a.requests, "max_tokens": 64, "setups": {
                      name: {"verify_ms_per_step": [x["verify_ms_per_step"] for x in xs],
                             "verify_ms_median": statistics.median(
                                 x["verify_ms_per_step"] for x in xs),
                             "tok_s_without_pause": [x["tok_s_without_pause"] for x in xs],
                             "outputs_identical": all(x["outputs"] == reference for x in xs)}
                      for name, xs in runs.items()}}
    finally:
        ray.shutdown()
    for name, s in result["setups"].items():
        print(f"{name:>34}: verify median {s['verify_ms_median']:.2f} ms/step, outputs identical "
              f"{s['outputs_identical']}")
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
