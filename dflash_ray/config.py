"""User-facing engine configuration (pydantic: YAML, CLI and Python all go through it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# z-lab's reference behaviour: verify every block whole, speculate at any batch size, no cooldown.
WHOLE_BLOCK = {"spec_min_confidence": 0.0, "spec_max_batch": None, "spec_reject_cooldown": 0}
# The fastest lossless speculation setting measured per device class: what `spec_profile: device`
# gives the spec_* fields a config leaves unset (docs/benchmarks.md, "How the defaults were
# chosen"). On CPU every verified token costs compute, so blocks are cut where the drafter is
# unsure, a miss cools a sequence down, and batches above 2 decode plain. No GPU has been measured
# yet: CUDA keeps z-lab's published setting, where a longer verify costs next to nothing.
DEVICE_SPEC_DEFAULTS = {
    "cpu": {"spec_min_confidence": 0.1, "spec_max_batch": 2, "spec_reject_cooldown": 1},
    "cuda": WHOLE_BLOCK,
}


def spec_defaults(device: str, profile: str) -> dict:
    """The spec_* values `profile` gives a config on `device` (unset fields only)."""
    if profile == "whole_block":
        return WHOLE_BLOCK
    return DEVICE_SPEC_DEFAULTS.get(device.split(":")[0], WHOLE_BLOCK)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="Hugging Face directory of the target (Qwen3 / Qwen3-MoE)")
    drafter: str | None = Field(None, description="z-lab DFlash drafter directory; None = plain")
    block_size: int | None = Field(None, description="verify block B; default: the drafter's")
    spec_profile: Literal["device", "whole_block"] = Field(
        "device",
        description="where the spec_* settings below are not given: 'device' takes the fastest "
        "lossless setting measured for the device (CPU: spec_min_confidence 0.1, "
        "spec_max_batch 2, spec_reject_cooldown 1; CUDA: the whole block), 'whole_block' "
        "z-lab's reference behaviour (0, no limit, 0)",
    )
    spec_min_confidence: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="verify drafts only while the drafter's probability of the draft prefix "
        "stays >= this (lossless at any value); 0 verifies the whole block, right on GPUs where "
        "a longer verify costs next to nothing; on CPU every verified token costs compute and "
        "~0.1 pays; default from spec_profile",
    )
    spec_max_batch: int | Literal["auto"] | None = Field(
        None,
        description="speculate only while at most this many sequences run; above it decode "
        "plain (where verify is compute-bound, large batches gain nothing from drafts). "
        "'auto': learn it from the engine's own steps, per batch-size bucket the kind of step "
        "with fewer seconds per token, re-trying the other now and then (spec_policy.Adaptive); "
        "greedy output and the sampling distribution stay exact, but which kind runs depends "
        "on timing and the two draw different random numbers, so a seeded sampled request can "
        "give other text from run to run; a fixed limit too, when the number of requests "
        "running decides whether its steps speculate; None: no limit; default from "
        "spec_profile",
    )
    spec_reject_cooldown: int = Field(
        0,
        ge=0,
        description="after a verify step that rejected all of a sequence's drafts, it decodes "
        "plain for its next this-many steps that would speculate (lossless: the choice looks "
        "only at steps already done); acceptance comes in runs, so the step after a miss often "
        "misses too; default from spec_profile",
    )
    sampling: Literal["coupled", "rejection"] = Field(
        "coupled",
        description="how sampled requests (temperature > 0) draw tokens, both exact in "
        "distribution. 'coupled': each token is argmax(p / E), E exponential noise fixed by "
        "the request's seed and the token's position (the Gumbel-max trick); the drafter "
        "proposes with the same noise and a draft is kept when it equals the target's own "
        "draw, so a seeded request's text depends only on its seed and the target: the same "
        "with speculation on or off, in any batch, after preemption or a drafter loss. "
        "'rejection': speculative rejection sampling (accept d with probability p(d)/q(d)), "
        "which keeps a few more drafts but gives other text when other steps speculate",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="streamed deltas after a request's first carry at least this many tokens "
        "(the last one what is left); > 1 sends fewer, larger messages through Serve and HTTP, "
        "which pays at high concurrency where per-message overhead competes with decoding",
    )
    overlap: bool = Field(
        False,
        description="pipeline the steps: the workers compute step N+1 while the engine "
        "settles step N (detokenization, stop strings, outputs to streams), one step in flight "
        "in a thread of its own; a request that a stop string ends rides one more step, whose "
        "result is discarded. Output is the same either way",
    )
    device: str = Field("cpu", description="torch device of the in-process runner")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    drafter_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the drafter's weights and activations (it only proposes: the target's "
        "verification keeps the output exact whatever this is); auto: dtype when that is "
        "16-bit, else bfloat16 where the device multiplies bf16 natively (CUDA from Ampere, "
        "a CPU with AVX-512 BF16 or AMX), else dtype",
    )
    state_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="recurrent state of hybrid targets' Gated DeltaNet layers (Qwen3.5): "
        "bfloat16 halves its bytes per sequence; speculation stays lossless either way (the "
        "state is rounded after every token, as plain decoding stores it)",
    )
    cuda_graphs: Literal["auto", "on", "eager", "off"] = Field(
        "auto",
        description="decode, verify and drafter passes with no prefill in them run from CUDA "
        "graphs, the batch padded to the next bucket (1, 2, 4, 8, then multiples of 8 up to "
        "cuda_graph_max_batch) with pad sequences writing a scratch KV block; other steps run "
        "eagerly. 'on': capture (needs a CUDA device); 'auto': 'on' on CUDA, else 'off'; "
        "'eager': the same bucketed, padded static-buffer path without capture (any device; "
        "how the CPU tests check it); 'off': no padding. Sharded and hybrid (DeltaNet) "
        "targets run as 'off' (logged once), and so do MoE targets under capture unless the "
        "grouped-GEMM MoE kernel runs their experts (bf16 on compute capability 9.0+). Output "
        "is the same either way",
    )
    cuda_graph_max_batch: int = Field(
        32, ge=1, description="the largest bucket: bigger decode batches run eagerly"
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences decoding together")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="prefill token budget per step; default max_model_len"
    )
    max_model_len: int | None = Field(
        None, ge=2, description="prompt + output limit; default the target's max positions"
    )
    kv_block_len: int = Field(16, ge=1, description="positions per KV-cache block")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks; default from memory")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV memory; default 85% of free GPU memory or 1 GiB on CPU"
    )
    step_retries: int = Field(
        2,
        ge=0,
        description="times a running request is recomputed from its committed tokens after "
        "the workers were lost mid-step (executor=ray: a target shard died or hung past "
        "cluster.step_timeout_s), as after a preemption, before it fails with the error; "
        "0 fails it at once",
    )
    executor: Literal["local", "ray"] = "local"
    num_target_shards: int = Field(1, ge=1, description="target shard actors (executor=ray)")
    cluster: dict = Field(
        default_factory=dict,
        description="other RayExecutor options (dflash_ray.cluster.config.ClusterConfig): "
        "transport, placement_strategy, num_cpus_per_actor, timeouts, ...",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.block_size is not None and self.drafter is None and self.block_size != 1:
            raise ValueError(f"block_size={self.block_size} needs a drafter; plain decoding is 1")
        if isinstance(self.spec_max_batch, int) and self.spec_max_batch < 0:
            raise ValueError(f"spec_max_batch={self.spec_max_batch} must be >= 0 or 'auto'")
        if self.drafter is None and (self.spec_min_confidence or self.spec_max_batch is not None
                                     or self.spec_reject_cooldown):
            raise ValueError(
                "spec_min_confidence, spec_max_batch and spec_reject_cooldown need a drafter"
            )
        if self.drafter is not None:
            given = set(self.model_fields_set)
            for name, value in spec_defaults(self.device, self.spec_profile).items():
                if name not in given:
                    setattr(self, name, value)
        if self.block_size is not None and self.drafter is not None and self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be >= 2 with a drafter")
        if self.cuda_graphs == "on" and not self.device.startswith("cuda"):
            raise ValueError(
                f"cuda_graphs='on' needs a CUDA device, got device={self.device!r}; use "
                "'eager' for the padded path without capture, or 'auto'"
            )
        if self.executor == "local" and (self.num_target_shards != 1 or self.cluster):
            raise ValueError(
                f"num_target_shards={self.num_target_shards} and cluster options need "
                "executor='ray'"
            )
        return self
