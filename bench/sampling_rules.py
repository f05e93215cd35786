"""What the coupled sampling rule costs against speculative rejection sampling: the shipped pair
at concurrency 1, sampled (temperature > 0), plain and DFlash engines of each rule side by
side, rounds interleaved.

    python3 bench/sampling_rules.py [--temperatures 0.7 1.0] [--prompts 16] [--max-tokens 128]
                                    [--rounds 2] [--whole-block] [--out FILE]

Per temperature and rule: tok/s of plain and DFlash decoding, the speedup, the acceptance
length (tokens committed per verify step with drafts) and the acceptance rate (accepted /
proposed drafts). Coupled accepts a draft only when it equals the target's own draw from the
same noise; rejection accepts with probability min(1, p/q), the most any rule can (1 - TV per
position), so coupled's acceptance is the lower of the two and the question is by how much.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop, summarize  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402

RULES = ("coupled", "rejection")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--whole-block", action="store_true",
                   help="z-lab's whole block instead of the device defaults")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    target, drafter = demo_pair()
    profile = {"spec_profile": "whole_block" if args.whole_block else "device"}
    engines = {}
    for rule in RULES:
        engines[f"plain/{rule}"] = make_engine(EngineConfig(target=target, sampling=rule))
        engines[f"dflash/{rule}"] = make_engine(EngineConfig(
            target=target, drafter=drafter, sampling=rule, **profile))
    prompts = bench_prompts(target, args.prompts)
    quiet = tqdm(disable=True)
    result = {"prompts": args.prompts, "max_tokens": args.max_tokens, "rounds": args.rounds,
              **profile, "rows": []}
    bar = tqdm(total=len(args.temperatures) * args.rounds * len(engines), unit="run")
    for t in args.temperatures:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=t, ignore_eos=True)
        for e in engines.values():  # untimed warm-up
            closed_loop(e, prompts[:1], 1, params, quiet)
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for k in range(args.rounds):
            order = list(engines) if k % 2 == 0 else list(reversed(engines))
            for name in order:
                runs[name].append(closed_loop(engines[name], prompts, 1, params, quiet))
                bar.update(1)
        row = {"temperature": t}
        for rule in RULES:
            plain, spec = summarize(runs[f"plain/{rule}"]), summarize(runs[f"dflash/{rule}"])
            proposed = spec["proposed"]
            row[rule] = {
                "plain_tok_s": plain["tok_s"],
                "dflash_tok_s": spec["tok_s"],
                "speedup": spec["tok_s"] / plain["tok_s"],
                "acceptance_length": spec["acceptance_length"],
                "acceptance_rate": sum(spec["accepted_per_position"]) / proposed
                if proposed else 0.0,
                "mean_proposed": spec["mean_proposed"],
            }
        result["rows"].append(row)
    bar.close()
    for row in result["rows"]:
        for rule in RULES:
            r = row[rule]
            print(f"T={row['temperature']:<4} {rule:9s} plain {r['plain_tok_s']:6.1f} tok/s, "
                  f"dflash {r['dflash_tok_s']:6.1f} tok/s, speedup {r['speedup']:.2f}x, "
                  f"acceptance length {r['acceptance_length']:.2f}, "
                  f"rate {r['acceptance_rate']:.3f} of {r['mean_proposed']:.1f} proposed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
