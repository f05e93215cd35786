"""Overlapped engine vs the plain step on the shipped pair with the CPU defaults: tok/s at
concurrency 1 and 32, interleaved rounds in one run; writes docs/bench/overlap.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dflash_ray import LLM, SamplingParams, demo_pair

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(", "x = [",
           "def main():\n    ", "with open(", "try:\n    "]


def run(llm, concurrency: int, max_tokens: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens), use_tqdm=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="docs/bench/overlap.json")
    args = ap.parse_args()
    target, drafter = demo_pair()
    llms = {o: LLM(target, drafter, overlap=o) for o in (False, True)}
    for llm in llms.values():
        run(llm, 2, 8)  # warm-up
    rows = []
    for c in (1, 32):
        tps = {False: [], True: []}
        for _ in range(args.rounds):
            for o in (False, True):
                tps[o].append(run(llms[o], c, args.max_tokens))
        best = {o: max(v) for o, v in tps.items()}
        rows.append({"concurrency": c, "plain_tok_s": tps[False], "overlap_tok_s": tps[True],
                     "ratio_best": best[True] / best[False]})
        print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps({"max_tokens": args.max_tokens, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
