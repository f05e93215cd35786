"""The in-process model runner: a `DraftWorker` and a `TargetWorker` side by side on one device.

Its public methods (`execute`, `release`, `kv_capacity`) are the whole RPC surface an executor
calls. One `execute` is one engine step:

1. the drafter materializes the pending target features of each decoding sequence into its
   cache, then one drafter pass over every block `[bonus, MASK...]` -> drafts (spec decoding);
2. one target pass over all prefill tokens and all verify blocks together, and acceptance
   (greedy or rejection sampling) per sequence;
3. the target features of the committed tokens go back to the drafter for the next pass.

The Ray executor runs the same two workers in separate actors (`dflash_ray.cluster`), so draft
and verify have one implementation.
"""

from __future__ import annotations

import time

import torch

from ..core.step_io import StepBatch, StepResult
from .caches import PagedKVCache
from .draft_worker import DraftWorker
from .target_worker import TargetWorker
from .worker_config import DTYPES, ModelSpec, RunnerConfig, kv_blocks_that_fit

__all__ = ["DTYPES", "ModelRunner", "RunnerConfig"]


class ModelRunner:
    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.spec = ModelSpec.resolve(cfg)
        self.device = torch.device(cfg.device)
        self.target_worker = TargetWorker(cfg, self.spec)
        self.target = self.target_worker.model
        # In one process the drafter borrows the target's own embedding and LM head.
        self.draft_worker = (
            DraftWorker(cfg, self.spec, head=self.target) if cfg.drafter is not None else None
        )
        per_token = self.target_worker.kv_bytes_per_token()
        if self.draft_worker is not None:
            per_token += self.draft_worker.kv_bytes_per_token()
        self.kv_bytes_per_token = per_token
        self.num_kv_blocks = cfg.num_kv_blocks or kv_blocks_that_fit(cfg, per_token)
        self.target_worker.allocate(self.num_kv_blocks)
        if self.draft_worker is not None:
            self.draft_worker.allocate(self.num_kv_blocks)

    @property
    def target_cache(self) -> PagedKVCache:
        return self.target_worker.cache

    # ---- RPC surface ---------------------------------------------------------------------

    def kv_capacity(self) -> dict:
        return self.spec.info(self.num_kv_blocks, self.cfg.kv_block_len, self.kv_bytes_per_token)

    def release(self, seq_ids: list[int]) -> None:
        """Forget everything about finished or aborted sequences."""
        self.target_worker.release(seq_ids)
        if self.draft_worker is not None:
            self.draft_worker.release(seq_ids)

    def execute(self, batch: StepBatch) -> StepResult:
        t0 = time.perf_counter()
        drafts = None
        if self.draft_worker is not None:
            self.draft_worker.forget(batch.dropped)
            if batch.drafter_pass:
                drafts = self.draft_worker.draft(batch.decodes)
        t1 = self._sync_time()
        verified = self.target_worker.verify(batch, drafts)
        if self.draft_worker is not None:
            self.draft_worker.absorb(verified.features)
        t2 = self._sync_time()
        return StepResult(verified.results, draft_seconds=t1 - t0, verify_seconds=t2 - t1)

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
