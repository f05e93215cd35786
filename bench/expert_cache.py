"""Why a verify costs what it does on this CPU: one MoE expert's two GEMMs (the shipped target's
shapes, [640, 192] gate/up and [192, 320] down, SwiGLU between) over a few rows, cycling through
E experts so that the weights in play grow past what the cache holds, in fp32 as loaded and
widened from bf16 the way `ops.PackedWeight` keeps a weight that bf16 holds exactly.

    python3 bench/expert_cache.py [--rows 2] [--experts 1 2 4 8 16 32 64] [--out FILE]

Prints µs per expert call for each working set, and whether the widened products equal fp32's
bit for bit. The shipped target has 4 layers x 8 experts = 32 of them (23.6 MB in fp32).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dflash_ray.ops.cpu_packed import widened_linear  # noqa: E402

HIDDEN, INTER = 192, 320  # the shipped target's hidden and expert intermediate sizes


def expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
           widened: bool) -> torch.Tensor:
    lin = widened_linear if widened else F.linear
    gate, up = lin(x, gate_up, None).chunk(2, dim=-1)
    return lin(F.silu(gate) * up, down, None)


def timed(x, weights, widened: bool, calls: int) -> float:
    """Mean µs of one expert call, the experts taken in turn (after one warm-up lap)."""
    n = len(weights)
    for i in range(2 * n):
        expert(x, *weights[i % n], widened)
    start = time.perf_counter()
    for i in range(calls):
        expert(x, *weights[i % n], widened)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2, help="tokens routed to the expert")
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    most = max(a.experts)
    bf16 = [(torch.randn(2 * INTER, HIDDEN).bfloat16(), torch.randn(HIDDEN, INTER).bfloat16())
            for _ in range(most)]
    fp32 = [(g.float(), d.float()) for g, d in bf16]
    x = torch.randn(a.rows, HIDDEN)
    rows = []
    with torch.inference_mode():
        exact = all(torch.equal(expert(x, *w32, False), expert(x, *w16, True))
                    for w32, w16 in zip(fp32, bf16, strict=True))
        for n in a.experts:
            mb = n * sum(w.numel() for w in fp32[0]) * 4 / 1e6
            row = {"experts": n, "fp32_mb": round(mb, 1),
                   "fp32_us": round(timed(x, fp32[:n], False, a.calls), 1),
                   "widened_us": round(timed(x, bf16[:n], True, a.calls), 1)}
            rows.append(row)
            print(f"{n:3d} experts ({mb:5.1f} MB in fp32): fp32 {row['fp32_us']:6.1f} us, "
                  f"widened from bf16 {row['widened_us']:6.1f} us a call")
    print(f"widened products equal fp32's bit for bit: {exact}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "bit_equal": exact}, f, indent=1)


if __name__ == "__main__":
    main()
