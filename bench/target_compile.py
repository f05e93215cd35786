"""What torch.compile (inductor) would buy the target's steps on CPU: the shipped target's forward
and LM head at the c = 1 shapes of a plain decode step (1 token) and a verify (a 16-token
block), 256 key columns of which the context fills `--context`, eager against compiled, in one
process.

    python3 bench/target_compile.py [--dtype float32|bfloat16] [--context 200]

The MoE layers route tokens on the host (`ops.fast.moe_experts` reads the expert ids), which a
graph cannot trace, so the compiled variants take the experts one of these ways:

- `opaque`: the eager experts as a custom op, which inductor calls but does not see into (the
  rest of the layer, norms, RoPE, attention, router, is compiled around it), on the experts'
  unpacked weights;
- `packed-experts`: the same over the engine's CPU weight formats (`ops.PackedWeight`), and
  `packed-experts-frozen` with inductor's freezing (it packs the compiled linears' weights for
  oneDNN itself);
- `dense`: every expert over every token, weighted by the router's top-k weights (zero for the
  others), a fixed-shape formulation a graph holds whole; it does E / k times the experts' work.

The KV write is a custom op that declares its mutation of the cache, so inductor neither copies
the cache nor reorders the write past the attention that reads it. Prints each variant's time a
call against eager with and without the CPU weight formats, the first compiled call's time,
dynamo's graph and break counts, and the largest difference of the logits from eager. Not
wired into the engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time

import torch
import torch.nn.functional as F
from drafter_compile import _Cache, timed  # a sibling script: bench/ is on the path

from dflash_ray.demo import demo_pair
from dflash_ray.models.layers import prepack
from dflash_ray.models.qwen3 import Qwen3Target
from dflash_ray.ops import OPS, AttentionGroup, override


@torch.library.custom_op("dflash_bench::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


@torch.library.custom_op("dflash_bench::moe_experts", mutates_args=())
def opaque_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   weights: torch.Tensor, ids: torch.Tensor, expert_offset: int) -> torch.Tensor:
    return EAGER_EXPERTS(x, gate_up, down, weights, ids, expert_offset)


@opaque_experts.register_fake
def _(x, gate_up, down, weights, ids, expert_offset):
    return x.new_empty(x.shape)


def dense_experts(x, gate_up, down, weights, ids, expert_offset=0):
    """Every expert over every token; the router's weights pick the top-k (the rest weigh 0)."""
    dense = x.new_zeros(x.shape[0], gate_up.shape[0]).scatter_(1, ids - expert_offset, weights)
    gate, up = torch.einsum("th,eih->eti", x, gate_up).chunk(2, dim=-1)
    y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down)
    return torch.einsum("eth,te->th", y, dense)


EAGER_EXPERTS = OPS.moe_experts


PACKED: dict[int, tuple] = {}  # layer -> (packed gate_up per expert, packed down, offset)


@torch.library.custom_op("dflash_bench::packed_experts", mutates_args=())
def packed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   layer: int) -> torch.Tensor:
    gate_up, down, offset = PACKED[layer]
    return EAGER_EXPERTS(x, gate_up, down, weights, ids, offset)


@packed_experts.register_fake
def _(x, weights, ids, layer):
    return x.new_empty(x.shape)


def routed_packed(self, x):
    weights, ids = OPS.route_experts(self.gate(x), self.top_k, self.normalize)
    return packed_experts(x, weights, ids, self.layer_index)


def set_packing(model, packed: dict) -> None:
    """Put the packed copies back (`packed` from `prepack`) or take them off (empty dict)."""
    for m in model.modules():
        if hasattr(m, "prepack"):
            m.packed = packed.get(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--context", type=int, default=200, help="cached keys before the new tokens")
    ap.add_argument("--cache-slots", type=int, default=4096, help="slots of each layer's cache")
    ap.add_argument("--variants", nargs="+",
                    default=["opaque", "dense", "packed-experts", "packed-experts-frozen"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, a.dtype)
    model = Qwen3Target.from_pretrained(demo_pair()[0], dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    prepack(model)
    packed = {m: m.packed for m in model.modules() if hasattr(m, "prepack")}
    for i, layer in enumerate(model.layers):
        layer.mlp.layer_index = i
        e = layer.mlp.experts
        PACKED[i] = (*e.packed, e.offset)
    d, keys = model.cfg.decoder, 256
    cache = _Cache([tuple(torch.randn(a.cache_slots, model.num_kv_heads, d.head_dim,
                                      dtype=dtype) for _ in range(2)) for _ in model.layers])

    def forward(ids, positions, write_slots, group_tensors):
        group = AttentionGroup(*group_tensors, dense=True)
        hidden, _ = model(ids, positions, cache, write_slots, [group])
        return model.logits(hidden)

    moe_cls = type(model.layers[0].mlp)
    eager_routed = moe_cls.routed
    for q in (1, 16):
        if a.context + q > keys:
            ap.error(f"--context {a.context} + {q} new tokens must fit {keys} key columns")
        mask = torch.zeros(1, 1, q, keys, dtype=torch.bool)
        mask[..., : a.context] = True
        mask[0, 0, :, a.context: a.context + q] = torch.ones(q, q, dtype=torch.bool).tril()
        group = (torch.arange(q).view(1, q), torch.ones(1, q, dtype=torch.bool),
                 torch.arange(keys).view(1, keys), mask)
        positions = torch.arange(a.context, a.context + q)
        args = (torch.randint(4, model.cfg.vocab_size, (q,)), positions, positions.clone(),
                group)
        with torch.inference_mode():
            set_packing(model, packed)
            times = {"eager packed": timed(forward, args)}
            reference = forward(*args)
            set_packing(model, {})
            times["eager unpacked"] = timed(forward, args)
            for name in a.variants:
                torch._dynamo.reset()
                torch._inductor.config.freezing = name.endswith("frozen")
                experts = dense_experts if name == "dense" else opaque_experts
                if name.startswith("packed-experts"):
                    moe_cls.routed = routed_packed
                try:
                    with override("store_kv", store_kv), override("moe_experts", experts):
                        compiled_fn = torch.compile(forward, dynamic=False)
                        start = time.perf_counter()
                        out = compiled_fn(*args)
                        first = time.perf_counter() - start
                        times[name] = timed(compiled_fn, args)
                        graphs = torch._dynamo.explain(forward)(*args)
                finally:
                    moe_cls.routed = eager_routed
                diff = (out - reference).abs().max().item()
                same = bool((out.argmax(-1) == reference.argmax(-1)).all())
                print(f"q={q} {name}: {times[name]:.0f} us, first call {first:.1f} s, "
                      f"{graphs.graph_count} graph(s), {graphs.graph_break_count} break(s), "
                      f"max |logit diff| {diff:.3g}, argmax equal: {same}")
        base = times["eager packed"]
        print(f"q={q}: " + ", ".join(f"{k} {v:.0f} us ({base / v:.2f}x)"
                                     for k, v in times.items()))


if __name__ == "__main__":
    main()
