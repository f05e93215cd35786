"""What the CPU weight formats (`ops.PackedWeight`) buy on this CPU: plain and DFlash engines
with the default formats (`packed`: fp32 weights that bf16 holds exactly widened from bf16, the
rest in oneDNN's layout), with every weight in oneDNN's layout (`onednn`, the default before
widening) and with the reference path (`ref`, `DFLASH_OPS=ref`: the checkpoint's own layout),
one process, the same prompts, rounds interleaved. Greedy; reports tok/s, ms per step and its
draft / verify split, each round's ratios, and whether all engines decode the same tokens.

    python3 bench/packed_weights.py                        # demo pair, c = 1, threshold 0.1
    python3 bench/packed_weights.py --concurrency 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
from statistics import median

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402
from dflash_ray.ops import cpu_packed  # noqa: E402

VARIANTS = ("ref", "onednn", "packed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--spec-min-confidence", type=float, default=0.1)
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args()
    target, drafter = demo_pair()
    prompts = bench_prompts(target, args.num_prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    common = dict(target=target, max_num_seqs=args.concurrency, dtype=args.dtype)
    engines = {}
    exact_in_bf16 = cpu_packed.exact_in_bf16
    for ops in VARIANTS:
        # read when the workers build their models: set them around each engine's construction
        os.environ["DFLASH_OPS"] = "ref" if ops == "ref" else "auto"
        cpu_packed.exact_in_bf16 = (lambda w: False) if ops == "onednn" else exact_in_bf16
        engines[f"plain/{ops}"] = make_engine(EngineConfig(**common))
        engines[f"dflash/{ops}"] = make_engine(EngineConfig(
            **common, drafter=drafter, spec_min_confidence=args.spec_min_confidence))
    os.environ.pop("DFLASH_OPS")
    cpu_packed.exact_in_bf16 = exact_in_bf16
    for e in engines.values():
        closed_loop(e, prompts[:1], 1, params, tqdm(disable=True))
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    outputs = {}
    with tqdm(total=args.rounds * len(engines) * len(prompts), desc="packed", unit="req") as bar:
        for _ in range(args.rounds):
            for name, e in engines.items():
                r = closed_loop(e, prompts, args.concurrency, params, bar)
                outputs[name] = sorted(r.pop("outputs"))
                runs[name].append(r)
    rows = []
    for name, rs in runs.items():
        row = {"engine": name}
        for key in ("tok_s", "ms_per_step", "draft_ms_per_step", "verify_ms_per_step",
                    "mean_tau"):
            row[key] = median(r[key] for r in rs)
        rows.append(row)
    tok = {r["engine"]: r["tok_s"] for r in rows}
    same = all(o == outputs["plain/ref"] for o in outputs.values())
    for r in rows:
        plain = tok["plain/" + r["engine"].split("/")[1]]
        print(f"{r['engine']:>14}: {r['tok_s']:7.1f} tok/s ({r['tok_s'] / plain:.2f}x its plain)"
              f"  step {r['ms_per_step']:.2f} ms (draft {r['draft_ms_per_step']:.2f}, verify "
              f"{r['verify_ms_per_step']:.2f})  tau {r['mean_tau']:.2f}")
    pairs = [(kind, old) for kind in ("plain", "dflash") for old in ("onednn", "ref")]
    ratios = {f"{kind}/packed_over_{old}": [
        round(a["tok_s"] / b["tok_s"], 3)
        for a, b in zip(runs[f"{kind}/packed"], runs[f"{kind}/{old}"], strict=True)]
        for kind, old in pairs}
    for name, rs in ratios.items():
        print(f"{name} by round: {rs}")
    print(f"all outputs identical: {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "round_ratios": ratios,
                       "outputs_identical": same}, f, indent=1)


if __name__ == "__main__":
    main()
