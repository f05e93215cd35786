"""The collective operations model code may call, behind one small interface.

Model layers call `comm.all_reduce(x)` where a row-parallel projection needs it; the world-size-1
`Communicator` here makes that a no-op, so single-process code pays nothing. `GroupCommunicator`
runs the same calls over a torch.distributed process group (gloo on CPU, NCCL on GPU); this
module is the only place that imports torch.distributed.

The group is a standalone `ProcessGroup` built from its own TCP store, never the process's
default group: a target rank can then also belong to another group (the drafter channel, which
Ray's collective library builds on the default group), and the group can be torn down and
formed again in a live process after a peer died.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class Communicator:
    """World size 1: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return x

    def close(self) -> None:
        pass


LOCAL = Communicator()


def open_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """A rendezvous store served by this process on a free port of `host`: (store, port).

    TCPStore's own server listens on every interface (`::`); it gets a socket bound to the
    address the ranks connect to instead, so the store is reachable from nowhere else."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.bind(addr)
    sock.listen()
    port, fd = sock.getsockname()[1], sock.detach()  # the store owns (and closes) the fd
    try:
        store = dist.TCPStore(host, port, None, True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise
    return store, port


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=timeout_s))


class GroupCommunicator(Communicator):
    """Collectives over a process group of `world_size` ranks.

    Built unconnected so a sharded model can be constructed (and its weights loaded) before the
    ranks meet; `connect` then forms the group. Every collective waits at most `timeout_s`, and a
    peer that dies makes the pending collective fail at once (its socket closes)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self._pg: dist.ProcessGroup | None = None

    def connect(
        self, backend: str, store: dist.Store, prefix: str, timeout_s: float, device=None
    ) -> None:
        """Form the group through `store`; `prefix` keeps the keys of successive groups apart."""
        timeout = timedelta(seconds=timeout_s)
        store = dist.PrefixStore(prefix, store)
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)
        elif backend == "nccl":
            if not dist.is_nccl_available():
                raise RuntimeError("backend 'nccl' needs a CUDA build of torch; use 'gloo'")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
        else:
            raise ValueError(f"backend {backend!r} is not 'gloo' or 'nccl'")
        self.all_reduce(torch.zeros(1, device=device))  # fail here, not in the first forward

    def _group(self) -> dist.ProcessGroup:
        if self._pg is None:
            raise RuntimeError(f"rank {self.rank}: the process group is not connected")
        return self._pg

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place when x is contiguous)."""
        x = x.contiguous()
        self._group().allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite x on every rank with rank `src`'s, in place."""
        self._group().broadcast(x, src).wait()
        return x

    def close(self) -> None:
        """Drop the group; peers blocked in a collective with us fail instead of waiting."""
        pg, self._pg = self._pg, None
        if pg is not None:
            pg.abort()


def release_default_group() -> None:
    """Destroy this process's default process group if one exists. Ray's collective library
    builds its gloo groups on the default group and leaves it behind when a group is destroyed;
    a new drafter channel can only form once it is gone."""
    if dist.is_initialized():
        dist.destroy_process_group()
