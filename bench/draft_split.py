"""Where the drafter's pass goes: wall-clock time per draft pass of its parts, at c = 1 on the
shipped pair with the default settings (greedy, one torch thread).

The parts are timed by wrapping the drafter worker's own methods with `perf_counter` (no
profiler: torch's profiler inflated some ops' self time several-fold here, e.g. a [4, 4096]
softmax at ~200 us against ~10 us timed alone). The parts nest: `draft` is the whole pass;
`context` (the intake of the committed tokens' features), `layout`, `forward` (the drafter's
layers over the block) and `propose` (LM head rows, argmax, the confidence cut) are inside it;
`lm_head` and `proposal_length` are inside `propose`.

    python3 bench/draft_split.py [--prompts 8 --max-tokens 128 --out docs/bench/draft_split.json]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from dflash_ray import LLM, SamplingParams  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.worker import draft_worker  # noqa: E402


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    torch.set_num_threads(1)
    target, drafter = demo_pair()
    llm = LLM(target, drafter)
    worker = llm.engine.executor.drafter
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                calls[name] += 1
        return wrapper

    worker.draft = timed("draft", worker.draft)
    worker._propose = timed("propose", worker._propose)
    worker.drafter.materialize_context = timed("context", worker.drafter.materialize_context)
    worker.drafter.forward = timed("forward", worker.drafter.forward)
    worker.head.logits = timed("lm_head", worker.head.logits)
    draft_worker.drafter_layout = timed("layout", draft_worker.drafter_layout)
    draft_worker.proposal_length = timed("proposal_length", draft_worker.proposal_length)

    prompts = bench_prompts(target, a.prompts)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    seconds.clear()
    calls.clear()
    for prompt in prompts:  # one at a time: c = 1
        llm.generate([prompt], params, use_tqdm=False)
    passes = calls["draft"]
    parts = {name: {"ms_per_pass": 1000 * seconds[name] / passes,
                    "share_of_pass": seconds[name] / seconds["draft"],
                    "calls_per_pass": calls[name] / passes} for name in seconds}
    for name, part in parts.items():
        share = 100 * part["share_of_pass"]
        print(f"{name:16s} {part['ms_per_pass']:7.3f} ms a pass  {share:5.1f} %"
              f"  {part['calls_per_pass']:.2f} calls a pass")
    result = {"prompts": a.prompts, "max_tokens": a.max_tokens, "draft_passes": passes,
              "parts": parts}
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
