"""What bucketing the packed GEMMs' row counts (`ops.cpu_packed.gemm_rows`) with a 256-entry
oneDNN primitive cache buys against a shape per row count with 64 entries (the setting before
commit 9a2c65b). oneDNN reads its cache capacity once, at its first primitive, so each variant
runs in its own process, the two alternated round by round; each child runs plain and DFlash
engines on the same prompts (greedy) and oneDNN's verbose log counts its primitive cache hits
and misses.

    python3 bench/primitive_cache.py [--rounds 3 --concurrency 1 --out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from statistics import median

os.environ.setdefault("OMP_NUM_THREADS", "1")

VARIANTS = {"per_row_count_64": "64", "buckets_256": "256"}


def child(variant: str, args: argparse.Namespace, out: str) -> None:
    """One variant's run (in a fresh process: the capacity is set before oneDNN starts)."""
    from dflash_ray.ops import cpu_packed

    if variant == "per_row_count_64":
        cpu_packed.gemm_rows = lambda m: m
    from tqdm import tqdm

    from dflash_ray.benchmark.offline import closed_loop
    from dflash_ray.benchmark.prompts import bench_prompts
    from dflash_ray.config import EngineConfig
    from dflash_ray.core.sampling_params import SamplingParams
    from dflash_ray.demo import demo_pair
    from dflash_ray.executors import make_engine

    target, drafter = demo_pair()
    prompts = bench_prompts(target, args.num_prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    common = dict(target=target, max_num_seqs=args.concurrency)
    result = {}
    for name, cfg in (("plain", EngineConfig(**common)),
                      ("dflash", EngineConfig(**common, drafter=drafter))):
        engine = make_engine(cfg)
        closed_loop(engine, prompts[:1], 1, params, tqdm(disable=True))  # warm-up
        r = closed_loop(engine, prompts, args.concurrency, params, tqdm(disable=True))
        result[name] = {"tok_s": r["tok_s"], "outputs": sorted(r["outputs"])}
        engine.shutdown()
    with open(out, "w") as f:
        json.dump(result, f)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": VARIANTS[variant],
               "ONEDNN_VERBOSE": "2"}
        cmd = [sys.executable, __file__, "--child", variant, "--child-out", out.name,
               "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
               "--max-tokens", str(args.max_tokens)]
        log = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        with open(out.name) as f:
            result = json.load(f)
    result["cache_misses"] = log.count("create:cache_miss")
    result["cache_hits"] = log.count("create:cache_hit")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args, args.child_out)
    rounds = []
    for i in range(args.rounds):
        rnd = {v: run_variant(v, args) for v in VARIANTS}
        rounds.append(rnd)
        line = ", ".join(f"{v}: plain {r['plain']['tok_s']:.0f} dflash {r['dflash']['tok_s']:.0f} "
                         f"tok/s, {r['cache_misses']} misses / {r['cache_hits']} hits"
                         for v, r in rnd.items())
        print(f"round {i + 1}: {line}", flush=True)
    old, new = VARIANTS
    ratios = {kind: [r[new][kind]["tok_s"] / r[old][kind]["tok_s"] for r in rounds]
              for kind in ("plain", "dflash")}
    same = all(r[v][kind]["outputs"] == rounds[0][old]["plain"]["outputs"]
               for r in rounds for v in VARIANTS for kind in ("plain", "dflash"))
    for kind, rs in ratios.items():
        print(f"{kind}: {new} / {old} = {median(rs):.2f}x (rounds "
              f"{', '.join(f'{x:.2f}' for x in rs)})")
    print(f"all outputs identical to plain decoding: {same}")
    if args.out:
        for r in rounds:
            for v in VARIANTS:
                for kind in ("plain", "dflash"):
                    r[v][kind].pop("outputs")
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
                       "rounds": rounds, "ratios": ratios, "median": {k: median(v) for k, v
                                                                    in ratios.items()},
                       "outputs_identical": same}, f, indent=1)


if __name__ == "__main__":
    main()
