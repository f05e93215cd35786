"""Which model class serves which checkpoint, keyed by the `architectures` of its config.json.

A new target family is a model class plus its architecture names here (and its config parsing
in `hf_config`); the workers only ever call `load_target` / `load_drafter`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..parallel.communicator import LOCAL, Communicator
from .dflash import DFlashDrafter
from .hf_config import DrafterConfig, TargetConfig, read_config
from .qwen3 import Qwen3Target
from .qwen3_next import Qwen3NextTarget
from .qwen35 import Qwen35Target
from .sharding import ShardSpec

TARGETS: dict[str, type[Qwen3Target]] = {
    "Qwen3ForCausalLM": Qwen3Target,
    "Qwen3MoeForCausalLM": Qwen3Target,
    "Qwen3_5ForCausalLM": Qwen35Target,
    "Qwen3_5ForConditionalGeneration": Qwen35Target,
    "Qwen3_5MoeForCausalLM": Qwen35Target,
    "Qwen3_5MoeForConditionalGeneration": Qwen35Target,
    "Qwen3NextForCausalLM": Qwen3NextTarget,
}
DRAFTERS = {"DFlashDraftModel": DFlashDrafter}


def load_target(model_dir: str | Path, dtype: torch.dtype, device, shard: ShardSpec | None = None,
                comm: Communicator = LOCAL) -> Qwen3Target:
    cls = TARGETS[TargetConfig.load(model_dir).architecture]
    return cls.from_pretrained(model_dir, dtype, device, shard, comm)


def load_drafter(model_dir: str | Path, dtype: torch.dtype, device) -> DFlashDrafter:
    DrafterConfig.load(model_dir)  # names what is wrong with an unsupported drafter
    archs = read_config(model_dir)["architectures"]
    cls = DRAFTERS[next(a for a in archs if a in DRAFTERS)]
    return cls.from_pretrained(model_dir, dtype, device)
