"""The target side of a step: the target (whole, or one rank's shard) and its paged KV cache.

One `verify` is one causal pass over every prefill token and every verify block, then (on the
lead rank) acceptance per sequence and the features of the committed tokens for the drafter.
Rollback of the target cache is implicit: the scheduler's lengths forget rejected positions.
Other ranks of a sharded target run `forward` only: they hold no sampling state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.step_io import DecodeItem, SamplingSpec, SeqResult, StepBatch
from ..models.layers import prepack
from ..models.qwen3 import Qwen3Target
from ..models.sharding import ShardSpec
from ..parallel.communicator import LOCAL, Communicator
from ..spec_decode import greedy_accept, processed_probs, rejection_accept, sample
from .caches import PagedKVCache, SeqSpan, build_layout
from .draft_worker import Drafts, proposed_lengths
from .worker_config import ModelSpec, RunnerConfig, seeded_generator


@dataclass(slots=True)
class Verified:
    results: list[SeqResult]  # prefills first, then decodes, in batch order
    # seq_id -> [committed rows, K*H] target features for the drafter (empty without a drafter)
    features: dict[int, torch.Tensor]


def verified_blocks(batch: StepBatch, drafts: Drafts | None) -> StepBatch:
    """The batch with every block cut to [bonus, proposed drafts]: q = 1 + proposed."""
    if drafts is None or not batch.decodes:
        return batch
    q = [d.num_queries for d in batch.decodes]
    lengths = proposed_lengths(drafts.tokens, q)
    if all(n == qi - 1 for n, qi in zip(lengths, q, strict=True)):
        return batch
    decodes = [
        d if d.num_queries == n + 1 else dataclasses.replace(d, num_queries=n + 1)
        for d, n in zip(batch.decodes, lengths, strict=True)
    ]
    return dataclasses.replace(batch, decodes=decodes)


class TargetWorker:
    def __init__(
        self,
        cfg: RunnerConfig,
        spec: ModelSpec,
        shard: ShardSpec | None = None,
        comm: Communicator = LOCAL,
    ):
        self.cfg, self.spec = cfg, spec
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        self.model = Qwen3Target.from_pretrained(cfg.target, self.dtype, self.device, shard, comm)
        prepack(self.model)
        self.cache: PagedKVCache | None = None
        self._generators: dict[int, torch.Generator] = {}

    def kv_bytes_per_token(self) -> int:
        d = self.model.cfg.decoder
        return PagedKVCache.bytes_per_token(
            d.num_layers, self.model.num_kv_heads, d.head_dim, self.dtype
        )

    def allocate(self, num_blocks: int) -> None:
        d = self.model.cfg.decoder
        self.cache = PagedKVCache(
            d.num_layers,
            num_blocks,
            self.cfg.kv_block_len,
            self.model.num_kv_heads,
            d.head_dim,
            self.dtype,
            self.device,
        )

    def release(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self._generators.pop(sid, None)

    def _generator(self, seq_id: int, spec: SamplingSpec) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = seeded_generator(spec, self.device, "target")
        return gen

    def forward(
        self, batch: StepBatch, drafts: Drafts | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The target pass: (final hidden [T, H], captured features [T, K*H] or None) over the
        prefill tokens then the blocks `[bonus, proposed drafts...]`; None for an empty batch."""
        return self._forward(verified_blocks(batch, drafts), drafts)

    @torch.inference_mode()
    def _forward(self, batch: StepBatch, drafts: Drafts | None):
        """`forward` over a batch already cut to the proposed drafts."""
        dev = self.device
        spans, ids, pos = [], [], []
        for p in batch.prefills:
            n = len(p.token_ids)
            spans.append(SeqSpan(p.block_table, 0, n, n))
            ids += p.token_ids
            pos += range(n)
        draft_rows = drafts.tokens.tolist() if drafts is not None else None
        for i, d in enumerate(batch.decodes):
            spans.append(SeqSpan(d.block_table, d.start, d.num_queries, d.num_queries))
            ids += [d.bonus] + (draft_rows[i][: d.num_queries - 1] if draft_rows else [])
            pos += range(d.start, d.start + d.num_queries)
        if not spans:
            return None
        write_slots, groups = build_layout(spans, self.cfg.kv_block_len, causal=True, device=dev)
        return self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.cache,
            write_slots,
            groups,
            capture=self.spec.capture,
        )

    @torch.inference_mode()
    def verify(self, batch: StepBatch, drafts: Drafts | None) -> Verified:
        """Forward, then accept per sequence. Without drafts every decode must be q = 1."""
        batch = verified_blocks(batch, drafts)
        out = self._forward(batch, drafts)
        if out is None:
            return Verified([], {})
        hidden, features = out
        # Rows whose logits we need: last prompt token of sampled prefills, every block row.
        logit_rows, offset = [], 0
        for p in batch.prefills:
            offset += len(p.token_ids)
            if p.sample:
                logit_rows.append(offset - 1)
        prefill_tokens = offset
        for d in batch.decodes:
            logit_rows += range(offset, offset + d.num_queries)
            offset += d.num_queries
        logits = (
            self.model.logits(
                hidden[torch.tensor(logit_rows, dtype=torch.long, device=hidden.device)]
            )
            if logit_rows
            else None
        )
        results: list[SeqResult] = []
        kept: dict[int, torch.Tensor] = {}
        row, feat_row = 0, 0
        for p in batch.prefills:
            n = len(p.token_ids)
            if features is not None:
                kept[p.seq_id] = features[feat_row : feat_row + n]
            feat_row += n
            tokens: list[int] = []
            if p.sample:
                tokens = [self._pick(logits[row : row + 1], p.seq_id, p.sampling)]
                row += 1
            results.append(SeqResult(p.seq_id, tokens))
        decoded = self._accept(batch.decodes, logits, row, drafts)
        for d, r in zip(batch.decodes, decoded, strict=True):
            if features is not None:
                kept[d.seq_id] = features[prefill_tokens : prefill_tokens + len(r.tokens)]
            prefill_tokens += d.num_queries
        return Verified(results + decoded, kept)

    def _pick(self, logits: torch.Tensor, seq_id: int, s: SamplingSpec) -> int:
        """One token from logits [1, V]: argmax, or a sample from the processed distribution."""
        if s.temperature == 0:
            return int(logits[0].argmax())
        probs = processed_probs(logits, s.temperature, s.top_k, s.top_p)
        return int(sample(probs, self._generator(seq_id, s))[0])

    def _accept(
        self,
        decodes: list[DecodeItem],
        logits: torch.Tensor | None,
        row: int,
        drafts: Drafts | None,
    ) -> list[SeqResult]:
        if not decodes:
            return []
        n = len(decodes)
        q_lens = [d.num_queries for d in decodes]
        # [N, max q] target logits rows gathered per sequence (padding repeats row 0)
        index = torch.zeros(n, max(q_lens), dtype=torch.long, device=logits.device)
        start = row
        for i, q in enumerate(q_lens):
            index[i, :q] = torch.arange(start, start + q)
            start += q
        tokens = drafts.tokens if drafts is not None else None
        accepted: list[int] = [0] * n
        committed: list[list[int]] = [[] for _ in range(n)]
        greedy = [i for i, d in enumerate(decodes) if d.sampling.temperature == 0]
        if greedy:
            g = torch.tensor(greedy, device=logits.device)
            argmax = logits[index[g]].argmax(dim=-1)  # [G, max q]
            if tokens is None:
                acc, bonus = [0] * len(greedy), argmax[:, 0].tolist()
            else:
                lens = torch.tensor([q_lens[i] for i in greedy])
                acc, bonus = greedy_accept(tokens[g][:, : argmax.shape[1] - 1], argmax, lens)
            for j, i in enumerate(greedy):
                accepted[i] = acc[j]
                committed[i] = tokens[i, : acc[j]].tolist() if tokens is not None else []
                committed[i].append(bonus[j])
        for i, d in enumerate(decodes):
            s = d.sampling
            if s.temperature == 0:
                continue
            q = q_lens[i]
            target_probs = processed_probs(logits[index[i, :q]], s.temperature, s.top_k, s.top_p)
            gen = self._generator(d.seq_id, s)
            if tokens is None or q == 1:
                committed[i] = sample(target_probs[:1], gen).tolist()
            else:
                res = rejection_accept(
                    tokens[i, : q - 1], drafts.probs[i][: q - 1], target_probs, gen
                )
                committed[i], accepted[i] = res.tokens, res.num_accepted
        return [
            SeqResult(d.seq_id, committed[i], d.num_queries - 1, accepted[i])
            for i, d in enumerate(decodes)
        ]
