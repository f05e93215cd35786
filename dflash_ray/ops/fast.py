"""Plain-torch fast paths of some ops: the reference's arithmetic in fewer torch calls.

At the shipped pair's sizes (hidden 192, blocks of <= 16 tokens) a step's time is mostly the
fixed cost of each torch call (~2-15 us on CPU), not its arithmetic, so each of these keeps
the reference's exact sequence of floating-point operations (bit-equal results, tested in
tests/test_cpu_step.py) and only drops calls that move data around:

- `paged_attention`: a group whose queries are the batch's rows in order, none padded (every
  decode or verify batch whose sequences all ask the same number of queries: c = 1 always)
  reads q as a view and returns SDPA's output reshaped, instead of a gather, a zeroed output
  and a masked scatter;
- `moe_experts`: with every expert on this rank (no expert parallelism) the expert outputs go
  back to (token, slot) order by one gather instead of a zeroed buffer and a scatter, and a
  one-token batch feeds its row to each expert without a gather;
- `silu_and_mul`: the product is written into SiLU's output, not a third buffer.

The registry (`ops.OPS`) picks these where no kernel stands in; `DFLASH_OPS=ref` forces the
references. Anything outside the cases above calls the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import reference
from .cpu_packed import PackedWeight
from .reference import AttentionGroup, linear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[AttentionGroup],
    scale: float,
) -> torch.Tensor:
    """`reference.paged_attention`; one dense group (see `AttentionGroup.dense`) covering
    every row of q skips the gather of q and the scatter of the output."""
    if len(groups) != 1 or not groups[0].dense:
        return reference.paged_attention(q, k_cache, v_cache, groups, scale)
    (g,) = groups
    n, num_q = g.query_rows.shape
    if n * num_q != q.shape[0]:
        return reference.paged_attention(q, k_cache, v_cache, groups, scale)
    og = reference.group_attention(q.view(n, num_q, *q.shape[1:]), k_cache, v_cache, g, scale)
    return og.reshape(q.shape)


def moe_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor | Sequence[PackedWeight],
    down: torch.Tensor | Sequence[PackedWeight],
    weights: torch.Tensor,
    ids: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """`reference.moe_experts` (same pair order, same GEMMs over the same rows, same sums)
    where every routed expert lives on this rank."""
    num_local, k = len(gate_up), ids.shape[1]
    experts = [e - expert_offset for e in ids.reshape(-1).tolist()]
    if not all(0 <= e < num_local for e in experts):  # expert parallelism: the reference
        return reference.moe_experts(x, gate_up, down, weights, ids, expert_offset)
    order = sorted(range(len(experts)), key=experts.__getitem__)  # stable: (expert, pair)
    one_token = x.shape[0] == 1
    xs = x.expand(len(order), -1) if one_token else x.index_select(
        0, torch.tensor([p // k for p in order], device=x.device))
    ys, lo = [], 0
    while lo < len(order):
        e, hi = experts[order[lo]], lo
        while hi < len(order) and experts[order[hi]] == e:
            hi += 1
        # one token: each expert runs that row itself (top-k experts are distinct)
        rows = x if one_token and hi - lo == 1 else xs[lo:hi].contiguous()
        ys.append(linear(silu_and_mul(linear(rows, gate_up[e])), down[e]))
        lo = hi
    if one_token and len(ys) == k:  # a row an expert: back in pair order, no index tensors
        by_pair = [ys[order.index(pair)] for pair in range(k)]
        return (torch.cat(by_pair) * weights.reshape(-1, 1)).view(-1, k, x.shape[1]).sum(dim=1)
    order_t = torch.tensor(order, device=x.device)
    by_expert = torch.cat(ys) * weights.reshape(-1, 1).index_select(0, order_t)
    inverse = [0] * len(order)
    for at, pair in enumerate(order):
        inverse[pair] = at
    per_slot = by_expert.index_select(0, torch.tensor(inverse, device=x.device))
    return per_slot.view(-1, k, x.shape[1]).sum(dim=1)


FAST = {
    "silu_and_mul": silu_and_mul,
    "paged_attention": paged_attention,
    "moe_experts": moe_experts,
}
