"""The target side of a step: the target (whole, or one rank's shard) and its caches.

`verify` is one causal pass over every prefill token and every verify block `[bonus, proposed
drafts]`, then (on the lead rank) acceptance per sequence, the explicit cache commit of what was
kept, and the features of the committed tokens kept for the drafter. The lead rank owns those
pending features (`take_features` hands them to the drafter's next pass); other ranks of a
sharded target run the same calls and hold neither features nor results.
"""

from __future__ import annotations

import torch

from ..core.step_io import SeqResult, StepBatch
from ..models.layers import prepack
from ..models.registry import load_target
from ..models.sharding import ShardSpec
from ..parallel.communicator import LOCAL, Communicator
from . import heap
from .caches import Commit, ModelCache, StateRun, bytes_per_seq, bytes_per_token
from .drafts import Drafts, PendingFeatures
from .graph_pass import SCRATCH_BLOCKS, GraphedPass, graph_mode, target_refusal
from .graphs import GraphShape, attention_group, padded_inputs
from .layout import SeqSpan, build_layout
from .sampler import accept, pick
from .trace import traced
from .worker_config import ModelSpec, WorkerConfig


class TargetWorker:
    role = "target"

    def __init__(
        self,
        cfg: WorkerConfig,
        spec: ModelSpec,
        shard: ShardSpec | None = None,
        comm: Communicator = LOCAL,
    ):
        self.cfg, self.spec, self.comm = cfg, spec, comm
        heap.setup()  # before the first step's tensors (see worker/heap.py)
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        self.model = load_target(cfg.target, self.dtype, self.device, shard, comm)
        prepack(self.model)
        self.cache: ModelCache | None = None
        self._pending = PendingFeatures()
        mode = graph_mode(cfg.cuda_graphs, self.device,
                          lambda capture: target_refusal(self.model.cfg, comm.world_size, capture,
                                                         self.dtype),
                          "target", lead=self.is_lead)
        # verify steps with no prefill, padded to their bucket (`graph_pass`)
        self.graphs = GraphedPass("target", mode, cfg.cuda_graph_max_batch, spec.max_position,
                                  self._graph_layout, self._graph_forward)
        self._scratch_block: int | None = None

    @property
    def is_lead(self) -> bool:
        return self.comm.rank == 0

    def kv_bytes_per_token(self) -> int:
        return bytes_per_token(self.model.cache_specs(), self.dtype)

    def state_bytes_per_seq(self) -> int:
        return bytes_per_seq(self.model.cache_specs(), self.dtype, self.cfg.state_torch_dtype)

    def allocate(self, num_blocks: int, num_slots: int | None = None) -> None:
        """Caches for `num_blocks` KV blocks (ids 0.. num_blocks-1, the block manager's), plus
        the scratch block where padded graph steps write their pad sequences (id num_blocks,
        never handed out)."""
        extra = SCRATCH_BLOCKS if self.graphs.active else 0
        self._scratch_block = num_blocks
        self.cache = ModelCache(self.model.cache_specs(), num_blocks + extra,
                                self.cfg.kv_block_len, self.dtype, self.device,
                                num_slots or self.cfg.max_num_seqs, self.cfg.state_torch_dtype)

    # ---- the step's methods, in the order `worker.step.target_step` calls them -------------

    @traced
    def release(self, batch: StepBatch) -> None:
        """Forget finished and preempted sequences (a preempted one is prefilled again)."""
        self._pending.drop(batch.released)
        self._pending.drop(batch.preempted)

    @traced
    def take_features(self, batch: StepBatch) -> torch.Tensor:
        """The waiting features of the drafter's decodes, concatenated in batch order."""
        decodes = [batch.decodes[i] for i in batch.drafter_decodes()]
        return torch.cat([self._pending.take(d.seq_id, d.context_rows) for d in decodes])

    @traced
    def share_drafts(self, batch: StepBatch, drafts: Drafts | None) -> Drafts | None:
        """Give every rank the lead's draft tokens (None where the drafter failed): each rank's
        forward needs the block tokens; only the lead needs the draft distributions."""
        if self.comm.world_size == 1:
            return drafts
        n, width = len(batch.decodes), self.spec.block_size - 1
        header = torch.zeros(1 + n * width, dtype=torch.long, device=self.device)  # [ok, ...]
        if self.is_lead and drafts is not None:
            header[0] = 1
            header[1:] = drafts.tokens.flatten()
        self.comm.broadcast(header)
        if not bool(header[0]):
            return None
        if self.is_lead:
            return drafts
        return Drafts.of(header[1:].view(n, width), [None] * n,
                         [d.num_queries for d in batch.decodes])

    @traced
    @torch.inference_mode()
    def verify(self, batch: StepBatch, drafts: Drafts | None,
               drafter_lost: bool = False) -> list[SeqResult] | None:
        """Forward, then (lead rank) accept per sequence, commit the caches and keep the
        committed tokens' features for the drafter's followed sequences. `drafts` None: every
        block verifies its bonus only. `drafter_lost`: the drafter's context is gone, so no
        feature is kept. Returns the results on the lead rank, None on the others."""
        heap.tick()
        out = self._forward(batch, drafts)
        if out is None:
            return [] if self.is_lead else None
        hidden, features = out
        if not self.is_lead:
            self._commit_kept(batch, drafts, None)
            return None
        proposed = drafts.num_proposed if drafts is not None else [0] * len(batch.decodes)
        # Rows whose logits we need: last prompt token of sampled prefills, every block row.
        logit_rows, offset = [], 0
        for p in batch.prefills:
            offset += len(p.token_ids)
            if p.sample:
                logit_rows.append(offset - 1)
        for n in proposed:
            logit_rows += range(offset, offset + 1 + n)
            offset += 1 + n
        logits = (
            self.model.logits(
                hidden[torch.tensor(logit_rows, dtype=torch.long, device=hidden.device)]
            )
            if logit_rows
            else None
        )
        results: list[SeqResult] = []
        row = 0
        for p in batch.prefills:
            tokens: list[int] = []
            if p.sample:
                tokens = [pick(logits[row : row + 1], p.sampling, len(p.token_ids) - 1)]
                row += 1
            results.append(SeqResult(p.seq_id, tokens))
        decoded = accept(batch.decodes, logits, row, drafts)
        self._commit_kept(batch, drafts, [len(r.tokens) for r in decoded])
        self._keep_features(batch, features, proposed, decoded, drafter_lost)
        return results + decoded

    def _commit_kept(self, batch: StepBatch, drafts: Drafts | None,
                     kept: list[int] | None) -> None:
        """Commit the caches on every rank: the lead knows how many positions each block kept
        (`kept`); a sharded hybrid target's other ranks hold recurrent state too, so they get
        the counts from the lead (attention-only targets forget by length: nothing to send)."""
        proposed = drafts.num_proposed if drafts is not None else [0] * len(batch.decodes)
        if batch.decodes and self.comm.world_size > 1 and self.model.cfg.linear is not None:
            counts = torch.zeros(len(batch.decodes), dtype=torch.long, device=self.device)
            if kept is not None:
                counts[:] = torch.tensor(kept, dtype=torch.long)
            self.comm.broadcast(counts)
            kept = counts.tolist()
        if kept is None:
            return
        self.cache.commit([Commit(d.slot, d.start, 1 + n, k)
                           for d, k, n in zip(batch.decodes, kept, proposed, strict=True)])

    def _keep_features(self, batch: StepBatch, features: torch.Tensor | None,
                       proposed: list[int], decoded: list[SeqResult], drafter_lost: bool) -> None:
        """Features [committed rows, K*H] of every followed sequence wait for the drafter."""
        if features is None:
            return
        if drafter_lost:
            self._pending.clear()
            return
        row = 0
        for p in batch.prefills:
            if p.drafter_follows:
                self._pending.add(p.seq_id, features[row : row + len(p.token_ids)])
            row += len(p.token_ids)
        for d, r, n in zip(batch.decodes, decoded, proposed, strict=True):
            if d.drafted_ctx is not None:
                self._pending.add(d.seq_id, features[row : row + len(r.tokens)])
            else:  # no longer followed (the drafter was lost): nothing waits for it
                self._pending.drop([d.seq_id])
            row += 1 + n

    def _forward(self, batch: StepBatch, drafts: Drafts | None):
        """(final hidden [T, H], captured features [T, K*H] or None) over the prefill tokens
        then the blocks `[bonus, proposed drafts...]`; None for an empty batch."""
        dev = self.device
        spans, ids, pos = [], [], []
        runs: dict[tuple[bool, int], tuple[list[int], list[int]]] = {}  # -> (first rows, slots)
        for p in batch.prefills:
            n = len(p.token_ids)
            spans.append(SeqSpan(p.block_table, 0, n, n))
            run = runs.setdefault((True, n), ([], []))
            run[0].append(len(ids))
            run[1].append(p.slot)
            ids += p.token_ids
            pos += range(n)
        rows = drafts.tokens.tolist() if drafts is not None else None
        for i, d in enumerate(batch.decodes):
            q = 1 + (drafts.num_proposed[i] if drafts is not None else 0)
            spans.append(SeqSpan(d.block_table, d.start, q, q))
            run = runs.setdefault((False, q), ([], []))
            run[0].append(len(ids))
            run[1].append(d.slot)
            ids += [d.bonus] + (rows[i][: q - 1] if rows else [])
            pos += range(d.start, d.start + q)
        if not spans:
            return None
        out = self.graphs.run(spans, ids, pos) if not batch.prefills else self.graphs.skip()
        if out is not None:
            hidden_size = self.model.cfg.decoder.hidden_size
            features = out[:, hidden_size:] if self.spec.capture else None
            return out[:, :hidden_size], features
        write_slots, groups = build_layout(spans, self.cfg.kv_block_len, causal=True, device=dev)
        if self.cache.state is not None:  # the recurrent layers' runs (`caches.StateRun`)
            self.cache.plan_states([
                StateRun(torch.tensor(firsts, device=dev)[:, None] + torch.arange(n, device=dev),
                         slots, prefill)
                for (prefill, n), (firsts, slots) in runs.items()])
        return self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.cache,
            write_slots,
            groups,
            capture=self.spec.capture,
        )

    def _graph_layout(self, spans: list[SeqSpan], ids: list[int], pos: list[int],
                      shape: GraphShape) -> dict[str, torch.Tensor]:
        return padded_inputs(spans, ids, pos, shape, self._scratch_block, self.cfg.kv_block_len,
                             True, self.device)

    def _graph_forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The verify pass over a padded step: [bucket * q, H] hidden, with the captured
        features [.., K*H] beside them where the drafter needs them."""
        hidden, features = self.model(inputs["input_ids"], inputs["positions"], self.cache,
                                      inputs["write_slots"], [attention_group(inputs)],
                                      capture=self.spec.capture)
        return hidden if features is None else torch.cat((hidden, features), dim=-1)
