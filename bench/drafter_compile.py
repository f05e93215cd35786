"""What torch.compile (inductor) would buy the drafter's block pass on CPU: the shipped drafter's
forward at one fixed c = 1 shape (one sequence, a 16-token block, 256 key columns of which the
context fills `--context`), eager against compiled, in one process.

    python3 bench/drafter_compile.py [--dtype bfloat16|float32] [--context 200]

Prints the eager time with and without packed weights, the compiled time, the first call's
compile time, dynamo's graph and break counts, and the largest difference of the outputs. The
drafter only proposes tokens, so a compiled pass that rounds differently changes no output; what
the engine would need is the padded, bucketed layout of `worker/graphs.py` (one compiled graph
per shape) and a way to hide the compile time. Not wired into the engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time

import torch

from dflash_ray.demo import demo_pair
from dflash_ray.models.dflash import DFlashDrafter
from dflash_ray.models.layers import prepack
from dflash_ray.ops import AttentionGroup


class _Cache:
    def __init__(self, layers):
        self.layers = layers

    def layer(self, i):
        return self.layers[i]


def timed(fn, args, calls: int = 300, repeats: int = 5) -> float:
    """Best mean time of one call, in microseconds."""
    for _ in range(20):
        fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--context", type=int, default=200, help="context keys before the block")
    ap.add_argument("--cache-slots", type=int, default=4096,
                    help="slots of each layer's KV cache (the demo engine's: 279616)")
    ap.add_argument("--one-buffer", action="store_true",
                    help="every layer's cache a view of one tensor, as worker/caches.py holds "
                         "them (default: a tensor per layer)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, a.dtype)
    model = DFlashDrafter.from_pretrained(demo_pair()[1], dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.cfg.decoder
    q, keys, slots = 16, 256, a.cache_slots
    if a.context + q > keys:
        ap.error(f"--context {a.context} + the block's {q} must fit {keys} key columns")
    if a.one_buffer:
        k, v = (torch.randn(len(model.layers), slots, d.num_kv_heads, d.head_dim, dtype=dtype)
                for _ in range(2))
        cache = _Cache([(k[i], v[i]) for i in range(len(model.layers))])
    else:
        cache = _Cache([tuple(torch.randn(slots, d.num_kv_heads, d.head_dim, dtype=dtype)
                              for _ in range(2)) for _ in model.layers])
    mask = torch.zeros(1, 1, q, keys, dtype=torch.bool)
    mask[..., : a.context + q] = True
    group = AttentionGroup(torch.arange(q).view(1, q), torch.ones(1, q, dtype=torch.bool),
                           torch.arange(keys).view(1, keys), mask, dense=True)
    groups = {kind: [group] for kind in model.attention_kinds()}
    args = (torch.randn(q, d.hidden_size, dtype=dtype), torch.arange(a.context, a.context + q),
            torch.arange(a.context, a.context + q))

    def forward(x, positions, write_slots):
        return model(x, positions, cache, write_slots, groups)

    with torch.inference_mode():
        eager = timed(forward, args)
        compiled_fn = torch.compile(forward, dynamic=False)
        start = time.perf_counter()
        out = compiled_fn(*args)
        compile_s = time.perf_counter() - start
        compiled = timed(compiled_fn, args)
        diff = (out.float() - forward(*args).float()).abs().max().item()
        explained = torch._dynamo.explain(forward)(*args)
        prepack(model)  # packed weights: the engine's eager path on x86 (dynamo cannot trace them)
        packed = timed(forward, args)
    print(f"{a.dtype}: eager {eager:.0f} us ({packed:.0f} us with packed weights), compiled "
          f"{compiled:.0f} us ({eager / compiled:.2f}x eager), first compiled call "
          f"{compile_s:.1f} s, {explained.graph_count} graph(s), "
          f"{explained.graph_break_count} break(s), max |difference| {diff:.3g}")


if __name__ == "__main__":
    main()
