"""What the workers are built from (`WorkerConfig`) and what follows from the checkpoints
(`ModelSpec`), shared by the in-process executor, the draft and target workers and the Ray
actors, so every process resolves block size, captured layers and cache sizing the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.step_io import ExecutorInfo
from ..models.hf_config import DrafterConfig, TargetConfig

GRAPH_MODES = ("auto", "on", "eager", "off")  # see EngineConfig.cuda_graphs
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class WorkerConfig:
    target: str
    drafter: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    drafter_dtype: str = "auto"  # see EngineConfig.drafter_dtype
    block_size: int | None = None  # verify block B; None = the drafter's own
    kv_block_len: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_gb
    kv_cache_gb: float | None = None  # None: 85% of free GPU memory, or 1 GiB on CPU
    max_num_seqs: int = 64  # sequences that need per-sequence cache state at once
    state_dtype: str = "float32"  # see EngineConfig.state_dtype
    # propose drafts while the drafter's probability of the draft prefix stays >= this
    # (0: always verify the whole block, as z-lab and SGLang do)
    spec_min_confidence: float = 0.0
    cuda_graphs: str = "off"  # see EngineConfig.cuda_graphs; the workers' default: no graphs
    cuda_graph_max_batch: int = 32

    @classmethod
    def from_engine(cls, config) -> WorkerConfig:
        """The fields of an `EngineConfig` the workers need."""
        return cls(**{name: getattr(config, name) for name in cls.__slots__})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def state_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.state_dtype]

    @property
    def drafter_torch_dtype(self) -> torch.dtype:
        """The drafter's dtype: `drafter_dtype`, where "auto" is the target's dtype when that
        is 16-bit already, else bfloat16 on a device with a native bf16 GEMM, else the
        target's (fp32). Measured on the demo pair (2-core AVX-512-BF16 CPU, concurrency 1):
        a bf16 drafter pass took 1.54 ms against 1.79 ms in fp32, with the same drafts; the
        output is the target's either way."""
        if self.drafter_dtype != "auto":
            return DTYPES[self.drafter_dtype]
        if self.torch_dtype != torch.float32:  # already 16-bit: borrow the target's head
            return self.torch_dtype
        return torch.bfloat16 if native_bf16(torch.device(self.device)) else self.torch_dtype

    def cache_budget(self) -> int:
        """Bytes this process's caches may take."""
        device = torch.device(self.device)
        if self.kv_cache_gb is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.85)
        return int((self.kv_cache_gb or 1.0) * (1 << 30))


@dataclass(slots=True)
class ModelSpec:
    """The checkpoint facts every worker and the engine agree on."""

    block_size: int  # verify block B (1 = plain decoding)
    capture: list[int] | None  # target layers whose outputs feed the drafter; None = no drafter
    mask_token_id: int | None
    feature_dim: int  # width of the captured features, K * target hidden (0 without drafter)
    eos_token_ids: list[int]
    vocab_size: int
    max_position: int

    @classmethod
    def resolve(cls, cfg: WorkerConfig) -> ModelSpec:
        """Validate the configs against each other; raise ValueError naming the bad field."""
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}")
        if cfg.drafter_dtype != "auto" and cfg.drafter_dtype not in DTYPES:
            raise ValueError(
                f"drafter_dtype {cfg.drafter_dtype!r} is not 'auto' or one of {sorted(DTYPES)}"
            )
        if cfg.cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs {cfg.cuda_graphs!r} is not one of {list(GRAPH_MODES)}")
        target = TargetConfig.load(cfg.target)
        drafter = None
        block_size = 1
        if cfg.drafter is not None:
            drafter = DrafterConfig.load(cfg.drafter)
            drafter.check_fits(target)
            block_size = cfg.block_size or drafter.block_size
            if block_size < 2:
                raise ValueError(f"block_size {block_size} must be >= 2 with a drafter")
        elif cfg.block_size not in (None, 1):
            raise ValueError(f"block_size {cfg.block_size} needs a drafter (plain decoding is 1)")
        capture = drafter.target_layer_ids if drafter else None
        return cls(
            block_size=block_size,
            capture=capture,
            mask_token_id=drafter.mask_token_id if drafter else None,
            feature_dim=len(capture) * target.decoder.hidden_size if capture else 0,
            eos_token_ids=target.eos_token_ids,
            vocab_size=target.vocab_size,
            max_position=target.decoder.max_position,
        )

    def info(self, cfg: WorkerConfig, num_kv_blocks: int, num_slots: int, per_token: int,
             per_seq: int) -> ExecutorInfo:
        """What an executor tells the engine."""
        return ExecutorInfo(self.block_size, self.eos_token_ids, self.vocab_size,
                            self.max_position, num_kv_blocks, cfg.kv_block_len, num_slots,
                            per_token, per_seq)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (not by converting to fp32).

    `DFLASH_CPU_BF16=native|emulated` overrides the answer for CPUs, so a machine of one class
    can run what `drafter_dtype: auto` does on the other (the test suite runs both)."""
    if device.type == "cuda":  # Ampere and later (older GPUs emulate bf16)
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":  # AVX-512 BF16 or AMX; oneDNN emulates bf16 on plain AVX-512
        forced = os.environ.get("DFLASH_CPU_BF16")
        if forced is not None:
            if forced not in ("native", "emulated"):
                raise ValueError(f"DFLASH_CPU_BF16={forced!r}: use 'native' or 'emulated'")
            return forced == "native"
        has_isa = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return has_isa and torch.backends.mkldnn.is_available()
    return False
