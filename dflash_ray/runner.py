"""The model runner: owns the target, the drafter and their KV caches on one device.

Its public methods (`execute`, `release`, `kv_capacity`) are the whole RPC surface an executor
calls, in-process or in a Ray actor. One `execute` is one engine step:

1. materialize the pending target features of each decoding sequence into the drafter cache,
   then one drafter pass over every block `[bonus, MASK...]` -> drafts (spec decoding only);
2. one target pass over all prefill tokens and all verify blocks together;
3. accept (greedy or rejection sampling) per sequence;
4. keep the target features of the committed tokens for the next draft pass (rollback of the
   target cache is implicit: the scheduler's lengths forget rejected positions).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .kv_cache import PagedKVCache, SeqSpan, build_layout, slot_mapping
from .models.config import DrafterConfig, TargetConfig
from .models.dflash import DFlashDrafter
from .models.qwen3 import Qwen3Target
from .spec_decode import greedy_accept, processed_probs, rejection_accept, sample
from .step_io import DecodeItem, SamplingSpec, SeqResult, StepBatch, StepResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class RunnerConfig:
    target: str
    drafter: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int | None = None  # verify block B; None = the drafter's own
    kv_block_len: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_gb
    kv_cache_gb: float | None = None  # None: 85% of free GPU memory, or 1 GiB on CPU


class ModelRunner:
    def __init__(self, cfg: RunnerConfig):
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        dtype = DTYPES[cfg.dtype]
        target_cfg = TargetConfig.load(cfg.target)
        drafter_cfg = None
        if cfg.drafter is not None:
            drafter_cfg = DrafterConfig.load(cfg.drafter)
            drafter_cfg.check_fits(target_cfg)
        self.block_size = 1
        if drafter_cfg is not None:
            self.block_size = cfg.block_size or drafter_cfg.block_size
            if self.block_size < 2:
                raise ValueError(f"block_size {self.block_size} must be >= 2 with a drafter")
        elif cfg.block_size not in (None, 1):
            raise ValueError(f"block_size {cfg.block_size} needs a drafter (plain decoding is 1)")
        self.target = Qwen3Target.from_pretrained(cfg.target, dtype, self.device)
        self.drafter = (
            DFlashDrafter.from_pretrained(cfg.drafter, dtype, self.device) if cfg.drafter else None
        )
        self.capture = drafter_cfg.target_layer_ids if drafter_cfg else None
        self.mask_token_id = drafter_cfg.mask_token_id if drafter_cfg else None
        self.eos_token_ids = target_cfg.eos_token_ids
        self.vocab_size = target_cfg.vocab_size
        self.max_position = target_cfg.decoder.max_position

        td = target_cfg.decoder
        per_token = PagedKVCache.bytes_per_token(
            td.num_layers, self.target.num_kv_heads, td.head_dim, dtype
        )
        if self.drafter is not None:
            dd = drafter_cfg.decoder
            per_token += PagedKVCache.bytes_per_token(
                dd.num_layers, dd.num_kv_heads, dd.head_dim, dtype
            )
        self.num_kv_blocks = cfg.num_kv_blocks or self._blocks_from_memory(per_token)
        self.kv_bytes_per_token = per_token
        self.target_cache = PagedKVCache(
            td.num_layers,
            self.num_kv_blocks,
            cfg.kv_block_len,
            self.target.num_kv_heads,
            td.head_dim,
            dtype,
            self.device,
        )
        self.drafter_cache = None
        if self.drafter is not None:
            dd = drafter_cfg.decoder
            self.drafter_cache = PagedKVCache(
                dd.num_layers,
                self.num_kv_blocks,
                cfg.kv_block_len,
                dd.num_kv_heads,
                dd.head_dim,
                dtype,
                self.device,
            )
        self._pending: dict[int, torch.Tensor] = {}  # seq_id -> [c, K*H] features not yet drafted
        self._generators: dict[int, torch.Generator] = {}

    def _blocks_from_memory(self, per_token: int) -> int:
        gb = self.cfg.kv_cache_gb
        if gb is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.85)
        else:
            budget = int((gb or 1.0) * (1 << 30))
        return max(1, budget // (per_token * self.cfg.kv_block_len))

    # ---- RPC surface ---------------------------------------------------------------------

    def kv_capacity(self) -> dict:
        return {
            "num_kv_blocks": self.num_kv_blocks,
            "kv_block_len": self.cfg.kv_block_len,
            "block_size": self.block_size,
            "eos_token_ids": self.eos_token_ids,
            "vocab_size": self.vocab_size,
            "max_position": self.max_position,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    def release(self, seq_ids: list[int]) -> None:
        """Forget everything about finished or aborted sequences."""
        for sid in seq_ids:
            self._pending.pop(sid, None)
            self._generators.pop(sid, None)

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepResult:
        for sid in batch.dropped:
            self._pending.pop(sid, None)
        t0 = time.perf_counter()
        drafts, draft_probs = self._draft(batch.decodes)
        t1 = self._sync_time()
        results = self._verify(batch, drafts, draft_probs)
        t2 = self._sync_time()
        return StepResult(results, draft_seconds=t1 - t0, verify_seconds=t2 - t1)

    # ---- internals -----------------------------------------------------------------------

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _generator(self, seq_id: int, spec: SamplingSpec) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(8), "little")
            gen.manual_seed(seed % (1 << 64))  # any int is a valid seed
            self._generators[seq_id] = gen
        return gen

    def _draft(
        self, decodes: list[DecodeItem]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Drafts [N, B-1] for the decoding sequences (padding past q-1 is arbitrary), and for
        sampled sequences the distribution each draft row came from."""
        if self.drafter is None or not decodes:
            return None, []
        dev, blen = self.device, self.cfg.kv_block_len
        # 1. Context K/V of the tokens committed since the last draft pass, written once.
        ctx_spans = [
            SeqSpan(d.block_table, d.drafted_ctx, d.start - d.drafted_ctx, 0) for d in decodes
        ]
        features = []
        for d in decodes:
            pending = self._pending.pop(d.seq_id)
            if pending.shape[0] != d.start - d.drafted_ctx:
                raise RuntimeError(
                    f"seq {d.seq_id}: {pending.shape[0]} pending feature rows, expected "
                    f"{d.start - d.drafted_ctx}"
                )
            features.append(pending)
        ctx_pos = torch.tensor(
            [p for s in ctx_spans for p in range(s.num_cached, s.num_cached + s.num_new)],
            dtype=torch.long,
            device=dev,
        )
        self.drafter.materialize_context(
            torch.cat(features), ctx_pos, slot_mapping(ctx_spans, blen, dev), self.drafter_cache
        )
        # 2. One non-causal pass over every block [bonus, MASK, ...].
        spans = [SeqSpan(d.block_table, d.start, d.num_queries, d.num_queries) for d in decodes]
        write_slots, groups = build_layout(spans, blen, causal=False, device=dev)
        ids, pos = [], []
        for d in decodes:
            ids += [d.bonus] + [self.mask_token_id] * (d.num_queries - 1)
            pos += range(d.start, d.start + d.num_queries)
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        hidden = self.drafter(
            self.target.embed(ids_t), pos_t, self.drafter_cache, write_slots, groups
        )
        # 3. Logits at block positions 1..q-1 only, through the target's LM head.
        width = self.block_size - 1
        rows, offset = [], 0
        for d in decodes:
            rows += range(offset + 1, offset + d.num_queries)
            offset += d.num_queries
        logits = self.target.logits(hidden[torch.tensor(rows, dtype=torch.long, device=dev)])
        drafts = torch.zeros(len(decodes), width, dtype=torch.long, device=dev)
        probs_per_seq: list[torch.Tensor | None] = []
        start = 0
        for i, d in enumerate(decodes):
            n = d.num_queries - 1
            seq_logits = logits[start : start + n]
            start += n
            s = d.sampling
            if s.temperature == 0:
                drafts[i, :n] = seq_logits.argmax(dim=-1)
                probs_per_seq.append(None)
            else:
                q = processed_probs(seq_logits, s.temperature, s.top_k, s.top_p)
                drafts[i, :n] = sample(q, self._generator(d.seq_id, s)) if n else drafts[i, :0]
                probs_per_seq.append(q)
        return drafts, probs_per_seq

    def _verify(
        self,
        batch: StepBatch,
        drafts: torch.Tensor | None,
        draft_probs: list[torch.Tensor | None],
    ) -> list[SeqResult]:
        dev, blen = self.device, self.cfg.kv_block_len
        spans, ids, pos = [], [], []
        for p in batch.prefills:
            n = len(p.token_ids)
            spans.append(SeqSpan(p.block_table, 0, n, n))
            ids += p.token_ids
            pos += range(n)
        draft_rows = drafts.tolist() if drafts is not None else None
        for i, d in enumerate(batch.decodes):
            spans.append(SeqSpan(d.block_table, d.start, d.num_queries, d.num_queries))
            block = [d.bonus] + (draft_rows[i][: d.num_queries - 1] if draft_rows else [])
            ids += block
            pos += range(d.start, d.start + d.num_queries)
        if not spans:
            return []
        write_slots, groups = build_layout(spans, blen, causal=True, device=dev)
        hidden, features = self.target(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.target_cache,
            write_slots,
            groups,
            capture=self.capture,
        )

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
            self.target.logits(hidden[torch.tensor(logit_rows, dtype=torch.long, device=dev)])
            if logit_rows
            else None
        )

        results: list[SeqResult] = []
        row, feat_row = 0, 0
        for p in batch.prefills:
            n = len(p.token_ids)
            if features is not None:
                self._pending[p.seq_id] = features[feat_row : feat_row + n]
            feat_row += n
            tokens: list[int] = []
            if p.sample:
                tokens = [self._pick(logits[row : row + 1], p.seq_id, p.sampling)]
                row += 1
            results.append(SeqResult(p.seq_id, tokens))
        results += self._accept(
            batch.decodes, logits, row, drafts, draft_probs, features, prefill_tokens
        )
        return results

    def _pick(self, logits: torch.Tensor, seq_id: int, s: SamplingSpec) -> int:
        """One token from logits [1, V]: argmax, or a sample from the processed distribution."""
        if s.temperature == 0:
            return int(logits[0].argmax())
        probs = processed_probs(logits, s.temperature, s.top_k, s.top_p)
        return int(sample(probs, self._generator(seq_id, s))[0])

    def _accept(self, decodes, logits, row, drafts, draft_probs, features, feat_row):
        if not decodes:
            return []
        n = len(decodes)
        width = self.block_size
        q_lens = [d.num_queries for d in decodes]
        # [N, B] target logits rows gathered per sequence (padding repeats row 0)
        index = torch.zeros(n, width, dtype=torch.long, device=logits.device)
        start = row
        for i, q in enumerate(q_lens):
            index[i, :q] = torch.arange(start, start + q)
            start += q
        accepted: list[int] = [0] * n
        bonus: list[int] = [0] * n
        greedy = [i for i, d in enumerate(decodes) if d.sampling.temperature == 0]
        if greedy:
            g = torch.tensor(greedy, device=logits.device)
            argmax = logits[index[g]].argmax(dim=-1)  # [G, B]
            if drafts is None:
                acc, bon = [0] * len(greedy), argmax[:, 0].tolist()
            else:
                acc, bon = greedy_accept(
                    drafts[g], argmax, torch.tensor([q_lens[i] for i in greedy])
                )
            for j, i in enumerate(greedy):
                accepted[i], bonus[i] = acc[j], bon[j]
        committed: dict[int, list[int]] = {}
        for i, d in enumerate(decodes):
            s = d.sampling
            if s.temperature == 0:
                committed[i] = drafts[i, : accepted[i]].tolist() if drafts is not None else []
                committed[i].append(bonus[i])
                continue
            q = q_lens[i]
            target_probs = processed_probs(logits[index[i, :q]], s.temperature, s.top_k, s.top_p)
            gen = self._generator(d.seq_id, s)
            if drafts is None:
                committed[i] = sample(target_probs, gen).tolist()
                accepted[i] = 0
            else:
                res = rejection_accept(drafts[i, : q - 1], draft_probs[i], target_probs, gen)
                committed[i], accepted[i] = res.tokens, res.num_accepted
        out = []
        for i, d in enumerate(decodes):
            if features is not None:
                self._pending[d.seq_id] = features[feat_row : feat_row + accepted[i] + 1]
            feat_row += d.num_queries
            out.append(SeqResult(d.seq_id, committed[i], d.num_queries - 1, accepted[i]))
        return out
