"""Cache storage on one device, one store per kind of layer cache, with an explicit commit.

Owns the tensors; the block manager (ints only) owns which KV block and which state slot belongs
to whom. After every verify the target worker calls `commit` once with, per sequence, how many
of the block's positions were kept (accepted drafts + bonus): that is the rollback of the
rejected rest. Each kind does what it needs: attention K/V forgets rejected positions by length
(the bookkeeping's `num_cached` stops before them and their slots are overwritten later), so its
commit has nothing to do; a recurrent state must be restored to the state after the last kept
position of its sequence's slot (`Commit.slot`), which a new sequence's prefill then
overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.cache_spec import AttentionCacheSpec, CacheSpec, RecurrentStateSpec
from ..ops import OPS


@dataclass(slots=True)
class Commit:
    """One sequence's part of a verify: `num_verified` positions from `start`, of which the
    first `num_kept` are kept."""

    slot: int
    start: int
    num_verified: int
    num_kept: int


class PagedKVCache:
    """Keys and values of attention layers in pages of `block_len` positions."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, num_blocks * block_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_len = block_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def commit(self, commits: list[Commit]) -> None:
        """Nothing to restore: rejected positions are forgotten by length (module docstring)."""


@dataclass(slots=True)
class StateRun:
    """Sequences of one forward that a DeltaNet layer processes as one batch: all prefills of
    one length (from a zero state) or all verify blocks of one length (from their slots)."""

    rows: torch.Tensor  # [N, L] rows of the flattened token batch
    slots: list[int]
    prefill: bool


@dataclass(slots=True)
class _Pending:
    """What a verify block left for its commit, per DeltaNet layer: the window it started from,
    the conv inputs, the state after its last position and the rule's inputs (k, v, g, beta)
    to replay a shorter accepted prefix from (the state it started from is still the slot's:
    a verify never writes its slot)."""

    window: torch.Tensor  # [K-1, C]
    inputs: torch.Tensor  # [L, C]
    final: torch.Tensor  # [hv, dk, dv] fp32
    rule: tuple[torch.Tensor, ...]  # k, v [L, hv, d], g, beta [L, hv]


class RecurrentStateCache:
    """Per-sequence state of the Gated DeltaNet layers, in `num_slots` slots.

    A verify block does not overwrite its slot: the layer's `write` keeps what its commit needs,
    and `commit` stores exactly the state after the last kept position, that of the whole block
    when it was all kept, else replayed from the committed state over the kept prefix with the
    same recurrent op (rounded to the state dtype after every position as the verify was), and
    the conv window cut from the block's inputs. Replay rather than a snapshot per position:
    snapshots hold q states per sequence and layer until the commit (2.8 GiB per sequence for
    Qwen3.5-397B at q = 16, fp32); this holds one (the block's final state) plus the rule's
    inputs, q * hv * (dk + dv + 2) fp32 (245 MiB in all for that model, docs/qwen35.md), and
    the replay is one recurrent pass over the accepted tokens, only when a block was cut
    short. A prefill writes its final state directly (it is never rolled back).
    """

    def __init__(self, specs: list[RecurrentStateSpec], num_slots: int, dtype: torch.dtype,
                 state_dtype: torch.dtype, device: torch.device | str):
        s = specs[0]
        if any(x != s for x in specs):
            raise ValueError(f"DeltaNet layers of different shapes {sorted(set(specs))}")
        n = len(specs)
        self.conv = torch.zeros(n, num_slots, s.conv_kernel - 1, s.conv_dim, dtype=dtype,
                                device=device)
        self.ssm = torch.zeros(n, num_slots, s.num_v_heads, s.k_head_dim, s.v_head_dim,
                               dtype=state_dtype, device=device)
        self.state_dtype = state_dtype
        self.runs: list[StateRun] = []
        self._pending: dict[tuple[int, int], _Pending] = {}  # (layer, slot) -> its block

    def plan(self, runs: list[StateRun]) -> None:
        self.runs = runs
        self._pending.clear()

    def layer(self, i: int) -> StateLayer:
        return StateLayer(self, i)

    def commit(self, commits: list[Commit]) -> None:
        for c in commits:
            for layer in range(self.conv.shape[0]):
                p = self._pending.pop((layer, c.slot), None)
                if p is None:
                    continue
                kept = c.num_kept
                full = torch.cat((p.window, p.inputs))  # [K-1+L, C]
                self.conv[layer, c.slot] = full[kept : kept + self.conv.shape[2]]
                if kept == len(p.inputs):
                    self.ssm[layer, c.slot] = p.final
                    continue
                k, v, g, beta = (t[None, :kept] for t in p.rule)
                _, states = OPS.gated_delta_rule_recurrent(
                    torch.zeros_like(k), k, v, g, beta, self.ssm[layer, c.slot][None],
                    self.state_dtype)
                self.ssm[layer, c.slot] = states[0, -1]
        self._pending.clear()


class StateLayer:
    """What one DeltaNet layer reads and writes of the state store in a forward (see
    `models/gated_deltanet.py`)."""

    def __init__(self, store: RecurrentStateCache, index: int):
        self.store, self.index = store, index

    @property
    def runs(self) -> list[StateRun]:
        return self.store.runs

    @property
    def state_dtype(self) -> torch.dtype:
        return self.store.state_dtype

    def read(self, run: StateRun) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows [N, K-1, C], states [N, hv, dk, dv]) the run starts from."""
        conv, ssm = self.store.conv[self.index], self.store.ssm[self.index]
        if run.prefill:
            n = len(run.slots)
            return (conv.new_zeros(n, *conv.shape[1:]), ssm.new_zeros(n, *ssm.shape[1:]))
        return conv[run.slots], ssm[run.slots]

    def write(self, run: StateRun, window: torch.Tensor, inputs: torch.Tensor,
              final: torch.Tensor, rule: tuple[torch.Tensor, ...]) -> None:
        conv, ssm = self.store.conv[self.index], self.store.ssm[self.index]
        if run.prefill:
            full = torch.cat((window, inputs), dim=1)
            conv[run.slots] = full[:, -conv.shape[1]:].to(conv.dtype)
            ssm[run.slots] = final.to(ssm.dtype)
            return
        for j, slot in enumerate(run.slots):
            self.store._pending[(self.index, slot)] = _Pending(
                window[j], inputs[j], final[j], tuple(t[j] for t in rule))


class ModelCache:
    """Every layer's cache of one model: `layer(i)` is what layer i reads and writes (paged K/V
    of attention layers; a `StateLayer` of DeltaNet layers)."""

    def __init__(self, specs: list[CacheSpec], num_blocks: int, block_len: int,
                 dtype: torch.dtype, device: torch.device | str, num_slots: int = 1,
                 state_dtype: torch.dtype = torch.float32):
        kinds = {type(s) for s in specs}
        if kinds - {AttentionCacheSpec, RecurrentStateSpec}:
            raise ValueError(f"no cache store for layer kinds {sorted(k.__name__ for k in kinds)}")
        attn = [i for i, s in enumerate(specs) if isinstance(s, AttentionCacheSpec)]
        rec = [i for i, s in enumerate(specs) if isinstance(s, RecurrentStateSpec)]
        self.stores: list = []
        self._layers: list = [None] * len(specs)
        self.kv = self.state = None
        if attn:
            heads = {(specs[i].num_kv_heads, specs[i].head_dim) for i in attn}
            if len(heads) != 1:
                raise ValueError(f"attention layers of different shapes {sorted(heads)}")
            (num_kv_heads, head_dim), = heads
            self.kv = PagedKVCache(len(attn), num_blocks, block_len, num_kv_heads, head_dim,
                                   dtype, device)
            self.stores.append(self.kv)
            for j, i in enumerate(attn):
                self._layers[i] = (self.kv, j)
        if rec:
            self.state = RecurrentStateCache([specs[i] for i in rec], num_slots, dtype,
                                             state_dtype, device)
            self.stores.append(self.state)
            for j, i in enumerate(rec):
                self._layers[i] = (self.state, j)

    def layer(self, i: int):
        store, index = self._layers[i]
        return store.layer(index)

    def plan_states(self, runs: list[StateRun]) -> None:
        """The sequences of the next forward, for the DeltaNet layers (no-op without them)."""
        if self.state is not None:
            self.state.plan(runs)

    def commit(self, commits: list[Commit]) -> None:
        for store in self.stores:
            store.commit(commits)


def bytes_per_token(specs: list[CacheSpec], dtype: torch.dtype) -> int:
    return sum(s.bytes_per_token(dtype) for s in specs)


def bytes_per_seq(specs: list[CacheSpec], dtype: torch.dtype,
                  state_dtype: torch.dtype = torch.float32) -> int:
    return sum(s.bytes_per_seq(dtype, state_dtype) for s in specs)


def plan_cache(budget: int, per_token: int, per_seq: int, block_len: int,
               max_seqs: int) -> tuple[int | None, int]:
    """(KV blocks, state slots) for `budget` bytes. Per-sequence state is reserved first, for
    `max_seqs` sequences or as many as fit in half the budget; the rest holds KV blocks. Without
    per-sequence state every running sequence has a slot for free; without per-token state (a
    shard that holds no attention) the blocks are None: this budget does not bound them."""
    slots = max_seqs if per_seq == 0 else max(1, min(max_seqs, budget // 2 // per_seq))
    if not per_token:
        return None, slots
    return max(1, (budget - slots * per_seq) // (per_token * block_len)), slots
