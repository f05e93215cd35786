"""What one `train-drafter` run is asked to do (the command line's fields), shared by the data
preparation and the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DrafterTrainArgs:
    target: str
    out: str
    num_layers: int = 2
    block_size: int = 16
    target_layer_ids: list[int] | None = None
    num_seqs: int = 800
    heldout_seqs: int = 48
    prompt_tokens: tuple[int, int] = (32, 96)
    response_tokens: int = 192
    num_anchors: int = 24
    batch_seqs: int = 8
    lr: float = 1e-3
    gamma: float = 7.0
    minutes: float | None = 20.0
    steps: int | None = None
    eval_every: int = 100
    checkpoint_minutes: float = 3.0
    threads: int = 2
    device: str = "cpu"
    init_from: str | None = None  # a z-lab drafter directory to start from
    # JSONL prompts to regenerate from (see `read_prompt_file`); None: stdlib corpus windows
    prompts: str | None = None
    max_prompt_tokens: int = 1024  # longer prompts in `prompts` are skipped
    target_dtype: str = "auto"  # the target's weights: bfloat16 on CUDA, float32 on CPU
    # cached: every sequence's target features in host memory, captured once; online: each
    # step's batch recomputed by the target (what a real target's data needs); auto: cached
    # while the estimate fits in half the available memory
    features: str = "auto"
    # bf16 autocast (fp32 master weights): 1.8x faster steps measured on a bf16-capable CPU
    precision: str = "bf16"
    seed: int = 0
    log: list[dict] = field(default_factory=list)

