"""gpu_check's `moe` section: the grouped-GEMM MoE (`dflash_kernels.moe`) against the reference
MoE on the device, its times, and whether a CUDA graph holds it.

Shapes: one MoE layer of Qwen3-30B-A3B (hidden 2048, 128 experts of width 768, top-8), bf16,
at 1, 16 and 64 tokens (a decode step, a 16-token verify, a batch of verifies). Per size: the
largest difference from the reference (which runs the same bf16 GEMMs expert by expert after a
host-side sort), kernel and reference milliseconds. Then, on CUDA, the kernel captured once in
a `torch.cuda.CUDAGraph` at 16 tokens and replayed with new routing written into its inputs:
equal to an eager call on the same inputs (what the engine's graphs need of an MoE layer).
`--small` runs 8 experts of width 64 at hidden 128 (CPU: torch's own grouped-GEMM fallback; no
capture).
"""

from __future__ import annotations

import torch

QWEN3_30B = dict(hidden=2048, width=768, experts=128, top_k=8)
SMALL = dict(hidden=128, width=64, experts=8, top_k=2)


def _inputs(tokens: int, hidden: int, width: int, experts: int, top_k: int, device: str,
            seed: int = 0):
    from dflash_ray.ops import reference

    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(torch.bfloat16)

    x = rand(tokens, hidden)
    gate_up = rand(experts, 2 * width, hidden, scale=hidden**-0.5)
    down = rand(experts, hidden, width, scale=width**-0.5)
    weights, ids = reference.route_experts(rand(tokens, experts), top_k, True)
    return x, gate_up, down, weights, ids


def run(args, median_ms) -> dict:
    from dflash_kernels import moe
    from dflash_ray.ops import reference

    dev = args.device
    shape = SMALL if args.small else QWEN3_30B
    out: dict = {"shape": shape}
    worst = 0.0
    for tokens in (1, 16, 64):
        x, gate_up, down, weights, ids = _inputs(tokens, **shape, device=dev)
        want = reference.moe_experts(x, gate_up, down, weights, ids)
        got = moe.moe_experts(x, gate_up, down, weights, ids)
        diff = (got.float() - want.float()).abs().max().item()
        worst = max(worst, diff / max(want.float().abs().max().item(), 1e-6))
        out[f"t{tokens}_max_abs_diff"] = diff
        out[f"t{tokens}_kernel_ms"] = median_ms(
            lambda a=(x, gate_up, down, weights, ids): moe.moe_experts(*a), dev, args.repeat)
        out[f"t{tokens}_reference_ms"] = median_ms(
            lambda a=(x, gate_up, down, weights, ids): reference.moe_experts(*a), dev,
            args.repeat)
    out["max_relative_diff"] = worst
    if worst > 2e-2:  # bf16 GEMMs summed in another order: a few bf16 ulps of the largest value
        raise AssertionError(f"grouped MoE differs from the reference by {worst:.3g} (relative)")
    if torch.device(dev).type == "cuda":
        out.update(_captured(shape, dev))
    else:
        out["capture"] = "skipped: no CUDA device"
    return out


def _captured(shape: dict, dev: str) -> dict:
    """Capture at 16 tokens, replay with other routing written into the static inputs."""
    from dflash_kernels import moe

    static = list(_inputs(16, **shape, device=dev))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (lazy inits, cuBLAS workspaces)
            moe.moe_experts(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = moe.moe_experts(*static)
    diffs = []
    for seed in (1, 2, 3):
        fresh = _inputs(16, **shape, device=dev, seed=seed)
        for buf, new in zip(static, fresh, strict=True):
            buf.copy_(new)
        graph.replay()
        want = moe.moe_experts(*fresh)
        diffs.append((result.float() - want.float()).abs().max().item())
    if max(diffs) != 0:
        raise AssertionError(f"the replayed MoE differs from an eager call: {diffs}")
    return {"capture": "replayed with new routing, equal to eager", "replay_diffs": diffs}
