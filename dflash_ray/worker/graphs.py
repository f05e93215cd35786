"""CUDA graphs for the fixed-shape passes (decode, verify, the drafter's block): which bucket a
batch runs in, how it is padded to it, and capture / replay with an eager fallback.

A graph replays fixed shapes at fixed addresses, so a step that uses one is laid out in a
*bucket*: `bucket` sequences of exactly `q` new tokens each (all of them queries), keys padded to
a fixed `key_capacity`. The step's real sequences ride first, in their order; the rest of the
bucket are pad sequences. A pad sequence has no cached keys and a block table of nothing but
the *scratch block*, a cache block outside the allocator's range that the worker reserves for
this, so its K/V writes land in scratch slots and never in another sequence's cache; its
queries read only its own scratch keys, its token ids are 0, and its output rows are dropped.
Key columns a sequence does not have are masked off (they point at slot 0 or the scratch block:
reads only, never seen).

What this module owns: the bucket choice, the padded layout, and `StepGraphs` (one captured
graph per shape, inputs copied into its static buffers before each replay). What it does not:
when the engine uses graphs. A captured pass must not sync with the host, which rules out the
reference `paged_attention` (boolean indexing) and the reference MoE (host-side sort): graphs
are for CUDA with the `dflash_kernels` attention in the registry. On CPU, `EagerReplay` stands
in for capture (it reruns the function on the static buffers), which is how the padding is
tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops import AttentionGroup
from .layout import SeqSpan, build_layout


def make_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8 up to `max_batch`
    (itself included), as vLLM and nano-vllm space theirs."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return tuple(small + list(range(16, max_batch, 8)) + [max_batch])


def choose_bucket(num_seqs: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `num_seqs` sequences; None (run eagerly) past the largest."""
    if num_seqs < 1:
        raise ValueError(f"a step needs at least one sequence, got {num_seqs}")
    return next((b for b in sorted(buckets) if b >= num_seqs), None)


@dataclass(slots=True)
class GraphShape:
    """What a captured graph is specialised to."""

    bucket: int  # sequences, real and pad
    q: int  # new tokens (= queries) per sequence
    key_capacity: int  # key columns of the attention layout


def graph_shape(spans: list[SeqSpan], buckets: tuple[int, ...], key_capacity: int,
                max_q: int = 32) -> GraphShape | None:
    """The shape this step runs in as a graph, or None where it must run eagerly: sequences of
    different lengths of new tokens, new tokens that are not all queries (a prefill or a
    context intake), more sequences than the largest bucket, or more keys than the capacity."""
    q = spans[0].num_new
    if any(s.num_new != q or s.num_queries != q for s in spans) or q > max_q:
        return None
    if max(s.num_cached + s.num_new for s in spans) > key_capacity:
        return None
    bucket = choose_bucket(len(spans), buckets)
    return None if bucket is None else GraphShape(bucket, q, key_capacity)


def pad_spans(spans: list[SeqSpan], shape: GraphShape, scratch_block: int,
              block_len: int) -> list[SeqSpan]:
    """The real spans, then pad spans up to the bucket, each writing only the scratch block."""
    if shape.q > block_len:
        raise ValueError(f"q ({shape.q}) must fit the scratch block ({block_len} slots)")
    pad = SeqSpan([scratch_block], 0, shape.q, shape.q)
    return list(spans) + [pad] * (shape.bucket - len(spans))


def padded_inputs(spans: list[SeqSpan], input_ids: list[int], positions: list[int],
                  shape: GraphShape, scratch_block: int, block_len: int, causal: bool,
                  device) -> dict[str, torch.Tensor]:
    """The step's inputs laid out in `shape`: token ids and positions of the real sequences
    (flattened in span order) followed by the pads', their write slots, and one attention
    group whose key columns are widened to the capacity (extra columns: scratch, masked)."""
    padded = pad_spans(spans, shape, scratch_block, block_len)
    write_slots, groups = build_layout(padded, block_len, causal, device)
    (g,) = groups
    return {**padded_ids(spans, input_ids, positions, shape, device),
            "write_slots": write_slots, **widened(g, shape, scratch_block * block_len)}


def padded_ids(spans: list[SeqSpan], input_ids: list[int], positions: list[int],
               shape: GraphShape, device) -> dict[str, torch.Tensor]:
    """Token ids and positions of the real sequences, then the pads' (ids 0, positions from
    0)."""
    num_pad = shape.bucket - len(spans)
    ids = list(input_ids) + [0] * (num_pad * shape.q)
    pos = list(positions) + list(range(shape.q)) * num_pad
    return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "positions": torch.tensor(pos, dtype=torch.long, device=device)}


def widened(g: AttentionGroup, shape: GraphShape, scratch_slot: int,
            tag: str = "") -> dict[str, torch.Tensor]:
    """One attention group's tensors with its key columns widened to `shape.key_capacity`
    (the extra columns read the scratch slot and are masked off), named with `tag` appended
    (a pass with masks of several kinds keeps one group per kind)."""
    n, width = g.key_slots.shape
    extra = shape.key_capacity - width
    key_slots = torch.cat((g.key_slots, g.key_slots.new_full((n, extra), scratch_slot)), dim=1)
    mask = torch.cat((g.mask, g.mask.new_zeros((n, 1, shape.q, extra))), dim=3)
    return {f"query_rows{tag}": g.query_rows, f"query_valid{tag}": g.query_valid,
            f"key_slots{tag}": key_slots, f"mask{tag}": mask}


def attention_group(inputs: dict[str, torch.Tensor], tag: str = "") -> AttentionGroup:
    """The attention group over a padded step's (static) layout tensors. Dense: every sequence
    of a bucket asks q queries, rows in order, so attention needs no gather of its queries nor
    scatter of its output (`ops.fast.paged_attention`), neither of which a graph could hold."""
    return AttentionGroup(inputs[f"query_rows{tag}"], inputs[f"query_valid{tag}"],
                          inputs[f"key_slots{tag}"], inputs[f"mask{tag}"], dense=True)


class Replay:
    """A captured pass: `replay()` reruns it on its static inputs and returns its output buffer
    (overwritten by the next replay)."""

    def __init__(self, replay: Callable[[], None], output: torch.Tensor):
        self._replay, self.output = replay, output

    def replay(self) -> torch.Tensor:
        self._replay()
        return self.output


def cuda_graph_capture(fn: Callable[[dict], torch.Tensor], static: dict,
                       pool=None) -> Replay:
    """Capture `fn(static)` in a CUDA graph, after one warm-up run on a side stream (compiles
    Triton kernels, lets the caching allocator settle), as torch's CUDA-graph notes do. The
    warm-up's writes are the ones the first replay repeats."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(static)
    return Replay(graph.replay, output)


def eager_replay(fn: Callable[[dict], torch.Tensor], static: dict, pool=None) -> Replay:
    """A stand-in for capture where none can run (CPU, tests): replay reruns `fn` on the same
    static buffers and copies its result into one output buffer, as a graph's replay would."""
    output = fn(static).clone()

    def replay() -> None:
        output.copy_(fn(static))

    return Replay(replay, output)


class StepGraphs:
    """One captured pass per `GraphShape`; `run` copies a step's padded inputs (a dict of
    tensors of fixed shapes for that `GraphShape`, the same names every step) into that
    shape's static buffers and replays. `fn(inputs) -> [bucket*q, ...]` must read its inputs only
    through the dict it is given."""

    def __init__(self, fn: Callable[[dict], torch.Tensor],
                 capture: Callable[..., Replay] = cuda_graph_capture,
                 share_pool: bool | None = None):
        """`share_pool`: capture every shape into one CUDA memory pool (default: when
        `capture` is `cuda_graph_capture`; say so where it is wrapped)."""
        self.fn, self.capture = fn, capture
        self.share_pool = capture is cuda_graph_capture if share_pool is None else share_pool
        self._graphs: dict[tuple[int, int, int], tuple[dict, Replay]] = {}
        self._pool = None

    def run(self, shape: GraphShape, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pass's output over the padded batch (rows of real sequences first); the buffer
        is the graph's own, so read it before the next `run` of this shape."""
        key = (shape.bucket, shape.q, shape.key_capacity)
        if key not in self._graphs:
            static = {name: t.clone() for name, t in inputs.items()}
            if self.share_pool and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one pool shared by every shape
            self._graphs[key] = (static, self.capture(self.fn, static, pool=self._pool))
            return self._graphs[key][1].replay()
        static, replay = self._graphs[key]
        for name, t in static.items():
            t.copy_(inputs[name])
        return replay.replay()

    def __len__(self) -> int:
        return len(self._graphs)
