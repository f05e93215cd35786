"""Which `spec_min_confidence` and `spec_reject_cooldown` (and block size) pay on this machine:
plain decoding vs DFlash at several settings, one process, the same prompts, rounds interleaved
(the order reversed every other round) so load drifts hit every setting alike. Greedy; reports
tok/s, speedup over plain, tokens per decode step and per verify step with drafts, mean drafts
verified per step, and the per-step time split (draft / verify) that explains the speedup.

    python3 bench/confidence_sweep.py                       # the demo pair, c = 1
    python3 bench/confidence_sweep.py --thresholds 0 0.1 0.3 --concurrency 4 --rounds 3
    python3 bench/confidence_sweep.py --thresholds 0.1 --cooldowns 0 1 2
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target")
    p.add_argument("--drafter")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--cooldowns", type=int, nargs="+", default=[0],
                   help="spec_reject_cooldown values (each threshold runs with each)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args()
    target, drafter = demo_pair()
    target, drafter = args.target or target, args.drafter or drafter
    prompts = bench_prompts(target, args.num_prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    seqs = max(1, args.concurrency)
    engines = {"plain": make_engine(EngineConfig(target=target, max_num_seqs=seqs))}
    for t in args.thresholds:
        for cd in args.cooldowns:
            engines[f"dflash@{t:g}" + (f"/cd{cd}" if cd else "")] = make_engine(EngineConfig(
                target=target, drafter=drafter, block_size=args.block_size, max_num_seqs=seqs,
                spec_min_confidence=t, spec_reject_cooldown=cd,
                spec_profile="whole_block"))  # no batch limit: only the swept knobs
    for e in engines.values():  # warm-up: first-call allocations, caches
        closed_loop(e, prompts[:1], 1, params, tqdm(disable=True))
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    reference = None
    with tqdm(total=args.rounds * len(engines) * len(prompts), desc="sweep", unit="req") as bar:
        for k in range(args.rounds):
            for name in list(engines)[:: 1 if k % 2 == 0 else -1]:
                r = closed_loop(engines[name], prompts, args.concurrency, params, bar)
                outputs = sorted(r.pop("outputs"))
                reference = reference or outputs
                r["outputs_identical"] = outputs == reference
                runs[name].append(r)
    base = median(r["tok_s"] for r in runs["plain"])
    rows = []
    for name, rs in runs.items():
        row = {"setting": name, "tok_s": median(r["tok_s"] for r in rs)}
        row["speedup"] = row["tok_s"] / base
        for key in ("mean_tau", "acceptance_length", "mean_proposed", "ms_per_step",
                    "draft_ms_per_step", "verify_ms_per_step"):
            row[key] = median(r[key] for r in rs)
        row["outputs_identical"] = all(r["outputs_identical"] for r in rs)
        rows.append(row)
        print(f"{name:>16}: {row['tok_s']:7.1f} tok/s  speedup {row['speedup']:.2f}x  "
              f"tau {row['mean_tau']:.2f} (with drafts {row['acceptance_length']:.2f})  "
              f"verified drafts {row['mean_proposed']:.1f}  step "
              f"{row['ms_per_step']:.2f} ms (draft {row['draft_ms_per_step']:.2f}, verify "
              f"{row['verify_ms_per_step']:.2f})  identical={row['outputs_identical']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
