"""SwiGLU experts as two grouped GEMMs (`torch.nn.functional.grouped_mm`), routed on the device.

`reference.moe_experts` sorts the (token, expert) pairs on the host (`ids.tolist()`) and runs two
GEMMs per hit expert: a host sync per MoE layer and 2 x (hit experts) launches, which a CUDA graph
cannot hold. Here the same arithmetic is laid out without the host:

1. each pair's local expert (`ids - expert_offset`); pairs routed to another rank's experts get
   the key E (they sort last and are zeroed at the end);
2. a stable argsort of the keys puts the pairs in the reference's (expert, pair) order, and a
   scatter-add of ones counts them per expert, whose cumulative sum gives the group ends `offs`;
3. the tokens gathered in that order, a grouped GEMM with gate_up, SiLU-mul, one with down:
   one launch each for all the experts;
4. the rows weighted by their routing weight, put back in (token, slot) order, and each token's
   k slots summed in slot order, as the reference sums them.

Shapes stay those of the step (no count is read back), so a captured graph replays it for any
routing. The grouped GEMM wants 16-byte aligned strides (hidden and expert widths that are
multiples of 8 in bf16, as every released MoE has); other shapes take the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dflash_ray.ops import reference

# public from torch 2.10; the private name before
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def aligned(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the grouped GEMM takes these operands (every row stride a multiple of 16 bytes)."""
    size = x.element_size()
    return all((d * size) % 16 == 0 for d in (x.shape[1], gate_up.shape[1], down.shape[2]))


def moe_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """`reference.moe_experts` (x [T, H], gate_up [E, 2I, H], down [E, H, I], weights/ids
    [T, k]) with grouped GEMMs and no host sync (module docstring)."""
    if not isinstance(gate_up, torch.Tensor) or not aligned(x, gate_up, down):
        return reference.moe_experts(x, gate_up, down, weights, ids, expert_offset)
    num_local, k = gate_up.shape[0], ids.shape[1]
    local = ids.reshape(-1) - expert_offset  # [P] pairs in (token, slot) order
    here = (local >= 0) & (local < num_local)
    key = torch.where(here, local, num_local)
    order = torch.argsort(key, stable=True)  # (expert, pair), other ranks' pairs last
    counts = torch.zeros(num_local + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = counts[:num_local].cumsum(0, dtype=torch.int32)  # group ends; the rest is not run
    xs = x.index_select(0, order // k)
    h = grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    y = grouped_mm(reference.silu_and_mul(h), down.transpose(1, 2), offs=offs)
    w = weights.reshape(-1, 1).index_select(0, order)
    # rows past the last group (other ranks' experts) are left unwritten by the GEMMs: select 0
    y = torch.where(here.index_select(0, order)[:, None], y * w, 0)
    per_slot = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
    return per_slot.view(-1, k, x.shape[1]).sum(dim=1)
