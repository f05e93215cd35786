"""What exporting metrics costs on the hot path: one DFlash engine (the demo config by
default), closed-loop rounds with the exporter attached and detached in turn, side by side.

    python3 bench/metrics_cost.py [--backend prometheus|ray] [--concurrency 1 32] [--rounds 6]

`prometheus` records through prometheus_client (what `dflash-ray bench --metrics-port` and an
offline engine use); `ray` through `ray.util.metrics` (what the Serve replica uses), inside a
Ray worker so the metrics go to a real agent. The exporter's watcher thread runs throughout, as
in a Serve replica. Prints tok/s per round, the paired ratios, and the share of wall time the
stepping thread spends inside the exporter (the direct measure: A/B ratios on a shared 2-core
box swing by more than the cost).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from statistics import median

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402
from dflash_ray.metrics.exporter import Exporter  # noqa: E402

DEMO = {"spec_min_confidence": 0.1, "spec_max_batch": 2, "spec_reject_cooldown": 1}


def measure(args: argparse.Namespace, backend) -> dict:
    target, drafter = demo_pair()
    engine = make_engine(EngineConfig(target=target, drafter=drafter,
                                      max_num_seqs=max(args.concurrency), **DEMO))
    exporter = Exporter(backend, "bench")
    exporter.watch(engine)  # as in a Serve replica: a thread hands the metrics to the backend
    spent = [0.0]  # seconds inside the exporter on the stepping thread, its direct cost there

    def listener(step):
        start = time.perf_counter()
        exporter.on_step(step)
        spent[0] += time.perf_counter() - start

    prompts = bench_prompts(target, args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    quiet = tqdm(disable=True)
    for c in args.concurrency:  # untimed warm-up of both shapes
        closed_loop(engine, prompts[:c], c, params, quiet)
    runs: dict = {c: {"on": [], "off": [], "share": []} for c in args.concurrency}
    for k in range(args.rounds):
        for c in args.concurrency:
            for mode in (("on", "off") if k % 2 == 0 else ("off", "on")):
                if mode == "on":
                    engine.add_listener(listener)
                    spent[0] = 0.0
                run = closed_loop(engine, prompts, c, params, quiet)
                runs[c][mode].append(run["tok_s"])
                if mode == "on":
                    engine.remove_listener(listener)
                    runs[c]["share"].append(spent[0] / run["seconds"])
    exporter.close()
    engine.shutdown()
    out = {}
    for c, r in runs.items():
        ratios = [a / b for a, b in zip(r["on"], r["off"], strict=True)]
        out[c] = {"on_tok_s": r["on"], "off_tok_s": r["off"], "on_over_off": ratios,
                  "median_ratio": median(ratios), "exporter_share": r["share"]}
        print(f"c={c}: on/off median {median(ratios):.3f} (rounds {min(ratios):.3f}-"
              f"{max(ratios):.3f}); tok/s on {median(r['on']):.1f}, off {median(r['off']):.1f};"
              f" time inside the exporter {100 * median(r['share']):.2f} % of wall time")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", choices=["prometheus", "ray"], default="prometheus")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.backend == "prometheus":
        from dflash_ray.metrics.prometheus import PrometheusBackend

        result = measure(args, PrometheusBackend())
    else:
        import ray

        from dflash_ray.server.ray_metrics import RayBackend

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        # in a Ray worker, as in a Serve replica: ray.util.metrics records through its agent
        result = ray.get(ray.remote(num_cpus=1)(measure).remote(args, RayBackend()))
        ray.shutdown()
    result = {"backend": args.backend, "demo_config": DEMO, **{f"c{c}": r
                                                               for c, r in result.items()}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
