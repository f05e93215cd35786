"""The in-process executor: a `TargetWorker` and a `DraftWorker` side by side on one device.

It builds both workers, sizes their caches together (they share block ids, so a block costs
both models' bytes) and runs `worker.step.target_step` with the draft worker as the drafts'
source. The Ray executor (`dflash_ray.cluster`) runs the same step functions in actors.
"""

from __future__ import annotations

from ..core.step_io import ExecutorInfo, StepBatch, StepResult
from .caches import plan_cache
from .draft_worker import DraftWorker
from .step import target_step
from .target_worker import TargetWorker
from .worker_config import ModelSpec, WorkerConfig


class LocalExecutor:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.spec = ModelSpec.resolve(cfg)
        self.target = TargetWorker(cfg, self.spec)
        # In one process the drafter borrows the target's own embedding and LM head.
        self.drafter = (
            DraftWorker(cfg, self.spec, head=self.target.model) if cfg.drafter is not None
            else None
        )
        per_token = self.target.kv_bytes_per_token()
        if self.drafter is not None:
            per_token += self.drafter.kv_bytes_per_token()
        per_seq = self.target.state_bytes_per_seq()
        blocks, slots = plan_cache(cfg.cache_budget(), per_token, per_seq, cfg.kv_block_len,
                                   cfg.max_num_seqs)
        self.num_kv_blocks = cfg.num_kv_blocks or blocks
        self._info = self.spec.info(cfg, self.num_kv_blocks, slots, per_token, per_seq)
        self.target.allocate(self.num_kv_blocks, slots)
        if self.drafter is not None:
            self.drafter.allocate(self.num_kv_blocks)

    def info(self) -> ExecutorInfo:
        return self._info

    def drafter_ready(self) -> bool:
        return self.drafter is not None

    def execute(self, batch: StepBatch) -> StepResult:
        return target_step(self.target, batch, self.drafter)

    def shutdown(self) -> None:
        pass
