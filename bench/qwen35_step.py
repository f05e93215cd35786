"""Qwen3.5 hybrid: ms per decode step and per 16-token verify, ours vs transformers, on a tiny
random Qwen3.5-MoE (CPU, one thread), and the state bytes per sequence of real shapes.

transformers cannot roll its recurrent state back, so its "verify" is timed as what it can do:
a 16-token forward on a deep copy of its cache (the copy is made outside the timed region); our
verify includes the commit of a block cut to 8 kept tokens (the replay). Usage:
    python bench/qwen35_step.py [--iters 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch


def tiny_target(path: str) -> str:
    from tests.conftest import save_qwen35

    return save_qwen35(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from tests.test_qwen35 import Harness

    path = tiny_target(tempfile.mkdtemp() + "/qwen35")
    prompt = list(range(1, 30))
    ours = Harness(path)
    ours.forward({0: prompt})
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(torch.tensor([prompt]), use_cache=True)
    cache = out.past_key_values

    def clock(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(args.iters):
            fn()
        return (time.perf_counter() - t) / args.iters * 1e3

    def our_decode():
        ours.forward({0: [3]})
        ours.commit({0: 1})
        ours.lens[0] = len(prompt)  # decode at the same position every time (timing only)

    def our_verify():
        ours.forward({0: list(range(4, 20))})
        ours.commit({0: 8})
        ours.lens[0] = len(prompt)

    def hf_step(n):
        def run():
            c = copy.deepcopy(cache)
            with torch.no_grad():
                ref(torch.tensor([list(range(4, 4 + n))]), past_key_values=c, use_cache=True)
        return run

    def copy_only():
        copy.deepcopy(cache)

    copy_ms = clock(copy_only)
    res = {
        "ours_decode_ms": clock(our_decode),
        "ours_verify16_ms": clock(our_verify),
        "hf_decode_ms": clock(hf_step(1)) - copy_ms,
        "hf_forward16_ms": clock(hf_step(16)) - copy_ms,
        "state_bytes_per_seq_tiny": sum(s.bytes_per_seq(torch.float32)
                                        for s in ours.model.cache_specs()),
    }
    print(json.dumps({k: round(v, 3) for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
