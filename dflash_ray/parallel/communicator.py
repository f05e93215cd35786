"""The collective operations model code may call, behind one small interface.

Model layers call `comm.all_reduce(x)` where a row-parallel projection needs it; the world-size-1
`Communicator` here makes that a no-op, so single-process code pays nothing. Process-group
versions (gloo / NCCL) live beside it and are the only place that imports torch.distributed.
"""

from __future__ import annotations

import torch


class Communicator:
    """World size 1: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return x


LOCAL = Communicator()
