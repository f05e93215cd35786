"""When a worker's pass runs from a CUDA graph (`EngineConfig.cuda_graphs`), and the pass that
does: `GraphedPass` lays a step out in its bucket (`worker/graphs.py`), runs it through that
shape's graph and hands back the real sequences' rows; a step that does not fit a bucket runs
eagerly, through the caller's own code.

Which steps ride a graph: those whose sequences all bring the same number q of new tokens, all
of them queries (a decode or verify step with no prefill; the drafter's block pass), at most
`cuda_graph_max_batch` of them, with at most the largest key capacity of keys each. Key
capacities are powers of two from MIN_KEY_CAPACITY up to the model's positions, so past
MIN_KEY_CAPACITY a step's attention reads under twice its keys, and a bucket has a few graphs,
not one per length. Each shape is captured at its first use, not at startup.

What may use graphs at all is decided once per worker (`graph_mode`), and a refusal is logged
once with its reason: a sharded target (its collectives are not captured here), a hybrid target
(the DeltaNet state runs per sequence on the host's plan) and, under capture, an MoE target
whose experts the registry runs with a host-side sort (anything but the grouped-GEMM kernel,
`dflash_kernels.moe`: bf16 on compute capability 9.0+). A capture that fails logs one
warning and the pass runs eagerly from then on.

What it does not own: the layout of an eager step, the model math, or the scratch block's
reservation (the worker allocates one block past the allocator's range, `SCRATCH_BLOCKS`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..ops import OPS
from .graphs import (
    GraphShape,
    Replay,
    StepGraphs,
    cuda_graph_capture,
    eager_replay,
    graph_shape,
    make_buckets,
)
from .layout import SeqSpan
from .worker_config import GRAPH_MODES

log = logging.getLogger(__name__)

MIN_KEY_CAPACITY = 256  # the smallest key width a graph is captured for
SCRATCH_BLOCKS = 1  # cache blocks past the allocator's range that a graphed worker keeps


def graph_mode(mode: str, device: torch.device, refusal: Callable[[bool], str | None],
               role: str, lead: bool = True) -> str:
    """What a worker runs: "on" (capture), "eager" (padded, no capture) or "off", from the
    configured `mode`. `refusal(capture)` is why this worker's model cannot use graphs (None:
    it can); a refusal gives "off" and is logged once, as a warning by the `lead` worker of a
    group (the other ranks of a sharded target say it at info level)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs={mode!r} is not one of {list(GRAPH_MODES)}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return "off"
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"cuda_graphs='on' needs a CUDA device, got device={str(device)!r}; "
                         "use 'eager' or 'auto'")
    effective = "eager" if mode == "eager" else "on"
    why = refusal(effective == "on")
    if why is not None:
        log.log(logging.WARNING if lead else logging.INFO,
                "%s: cuda_graphs=%r refused, running without graphs: %s", role, mode, why)
        return "off"
    log.info("%s: cuda_graphs=%r: %s", role, mode,
             "capturing CUDA graphs" if effective == "on" else "padded passes, no capture")
    return effective


def moe_on_device(dtype: torch.dtype) -> bool:
    """Whether the registry's `moe_experts` routes tokens to experts on the device for
    `dtype` (the grouped-GEMM kernel) rather than on the host (reference, fast path)."""
    return str(dtype).removeprefix("torch.") in getattr(OPS.moe_experts, "kernel_dtypes", ())


def target_refusal(cfg, world_size: int, capture: bool, dtype: torch.dtype) -> str | None:
    """Why a target (its `TargetConfig`, weights in `dtype`) cannot run graphed; None where
    it can."""
    if world_size > 1:
        return f"the target is sharded over {world_size} ranks"
    if cfg.linear is not None:
        return "a hybrid target's DeltaNet state is planned per sequence on the host"
    if capture and cfg.num_experts and not moe_on_device(dtype):
        return (f"the MoE layers sort tokens by expert on the host for {dtype} weights here, "
                "which a graph cannot hold (the grouped-GEMM kernel takes bf16 on compute "
                "capability 9.0+)")
    return None


def key_capacities(max_position: int) -> tuple[int, ...]:
    """Powers of two from MIN_KEY_CAPACITY up to the first that holds `max_position` keys."""
    caps = [MIN_KEY_CAPACITY]
    while caps[-1] < max_position:
        caps.append(caps[-1] * 2)
    return tuple(caps)


class GraphedPass:
    """One worker pass (the target's verify, the drafter's block pass) run from graphs where a
    step fits. `layout(spans, shape)` gives a step's padded inputs; `forward(inputs)` is the
    pass over them, reading nothing else that changes between steps, and returns
    [bucket * q, ...]. `stats` counts the steps that replayed a graph, the steps that ran
    eagerly and the shapes captured."""

    def __init__(self, name: str, mode: str, max_batch: int, max_position: int,
                 layout: Callable[[list[SeqSpan], list[int], list[int], GraphShape],
                                  dict[str, torch.Tensor]],
                 forward: Callable[[dict], torch.Tensor]):
        self.name, self.mode, self.layout = name, mode, layout
        self.buckets = make_buckets(max_batch)
        self.capacities = key_capacities(max_position)
        capture = cuda_graph_capture if mode == "on" else eager_replay
        self._graphs = StepGraphs(forward, self._guarded(capture), share_pool=mode == "on")
        self.stats = {"replays": 0, "eager": 0, "captured": 0}

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def shape(self, spans: list[SeqSpan]) -> GraphShape | None:
        """The shape this step runs in, or None: eagerly (module docstring)."""
        if not self.active or not spans:
            return None
        keys = max(s.num_cached + s.num_new for s in spans)
        cap = next((c for c in self.capacities if c >= keys), None)
        return None if cap is None else graph_shape(spans, self.buckets, cap)

    def run(self, spans: list[SeqSpan], input_ids: list[int],
            positions: list[int]) -> torch.Tensor | None:
        """The pass's rows of the real sequences ([len(spans) * q, ...], a copy: the graph's
        buffer is overwritten by its next replay), or None where the caller runs the step
        eagerly (counted as such). `input_ids`, `positions`: the real sequences' new tokens,
        flattened in span order."""
        shape = self.shape(spans)
        if shape is None:
            return self.skip()
        before = len(self._graphs)
        out = self._graphs.run(shape, self.layout(spans, input_ids, positions, shape))
        if self.mode == "off":  # the capture failed just now (logged): eager from now on
            return self.skip()
        self.stats["captured"] += len(self._graphs) - before
        self.stats["replays"] += 1
        return out[: len(spans) * shape.q].clone()

    def skip(self) -> None:
        """A step the caller runs eagerly (it has prefills, or did not fit)."""
        self.stats["eager"] += 1

    def _guarded(self, capture: Callable[..., Replay]) -> Callable[..., Replay]:
        """`capture`, where a failure logs one warning, turns this pass off and gives a replay
        that does nothing (its caller then runs the step eagerly)."""

        def guarded(fn, static, pool=None) -> Replay:
            try:
                return capture(fn, static, pool=pool)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back
                log.warning("%s: CUDA graph capture failed, running eagerly from now on: %r",
                            self.name, exc)
                self.mode = "off"
                return Replay(lambda: None, torch.empty(0))

        return guarded
