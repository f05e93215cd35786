"""The checks and timings that need a GPU, as one prepared run (everything else is tested on CPU).

Sections, each recorded in the JSON whether it passed, failed (with its traceback) or was
skipped, so one short run on a borrowed GPU brings back everything at once:

- lossless: the demo pair through the engine on the device, fp32 and bf16: greedy DFlash output
  token-for-token equal to plain decoding, tau, tok/s and ms per step at concurrency 1 and 8;
- hf_parity: our target's prefill logits vs transformers' own model on the device (fp32);
- timing: a random model of Qwen3-8B's shape (bf16) and a 5-layer drafter of z-lab's
  Qwen3-8B-DFlash-b16 shape: decode step at batch 1 / 8 / 32, a 16-token verify step and a
  drafter pass, each against the memory-bandwidth floor (weight bytes / measured copy bandwidth);
- train: `train-drafter` on the device for a few dozen steps (online features, bf16 target);
- kernels: that the registry picked the Triton kernels, and each kernel against its reference
  on the device (ragged paged batches: decode, 16-token verify, the drafter's non-causal block,
  a prefill group; fp32 and bf16), with kernel / reference times;
- graphs: a random target's decode and verify steps padded to their bucket and replayed from
  CUDA graphs (`worker/graphs.py`) against the same steps run eagerly, over several steps;
  then the demo pair through the engine with `cuda_graphs="on"` against "off": greedy tokens
  and acceptance lengths equal, ms per step at concurrency 1 and 8, steps that replayed a
  graph; `timing` then also times the steps with graphs;
- qwen35: a Qwen3.5-shaped (slice of 35B-A3B) decode step, 16-token verify and a verify cut
  to 8 kept tokens (the recurrent-state replay) against the floor of what each must read
  (`bench/qwen35_check.py`);
- fla: the flash-linear-attention adapters of the gated delta rule (`dflash_kernels/gated_delta.py`)
  against their references at Qwen3.5's DeltaNet widths, a 16-token verify of 8 sequences and a
  `--context` prefill, with adapter / reference times (`bench/fla_check.py`; skipped, saying
  why, without CUDA or fla);
- moe: the grouped-GEMM MoE (`dflash_kernels/moe.py`) against the reference MoE at one Qwen3-30B-A3B
  layer's shape (bf16; 1, 16, 64 tokens) with times, and captured in a CUDA graph, replayed with
  new routing: equal to eager (`bench/moe_check.py`; CPU: torch's fallback, no capture);
- nccl: two processes (torch.multiprocessing, no Ray) exchanging a hidden-state buffer and a
  draft block through `parallel.communicator.GroupCommunicator`, over NCCL (on two GPUs, or
  recording NCCL's refusal of two ranks on one GPU) and over gloo staging GPU tensors through
  host memory (the drafter channel's one-GPU setup).

On CPU, `graphs` runs the same steps with an eager stand-in for capture (the engine part with
`cuda_graphs="eager"`), `kernels` runs the
Triton code interpreted when TRITON_INTERPRET=1 is set (slow: minutes) and is skipped otherwise,
and `nccl` runs only its gloo pair. The whole run is sized for ~8 minutes on an H200.

    python3 bench/gpu_check.py --out gpu_check.json                  # on the GPU machine
    python3 bench/gpu_check.py --device cpu --small --out check.json # the same code on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# Qwen3-8B's published config and the shape of z-lab/Qwen3-8B-DFlash-b16's drafter.
QWEN3_8B = dict(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                rope_theta=1000000.0, max_position_embeddings=40960)
DRAFTER_8B = dict(num_hidden_layers=5, target_layer_ids=[1, 9, 17, 25, 33], block_size=16)
SMALL = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=4096, rope_theta=10000.0,
             max_position_embeddings=4096)
DRAFTER_SMALL = dict(num_hidden_layers=2, target_layer_ids=[1, 2], block_size=16)


REPO = Path(__file__).resolve().parents[1]


def use_this_checkout() -> str:
    """Import `dflash_ray` and `dflash_kernels` from this script's checkout: its root goes first
    on sys.path (an installed copy elsewhere, or none, as on the bare tree the device machine
    gets). Must run before `dflash_ray` is imported, whose op registry asks for kernels once.
    Returns where the kernels were found."""
    sys.path.insert(0, str(REPO))
    import dflash_kernels

    return str(Path(dflash_kernels.__file__).parent)


def cuda(args) -> bool:
    return torch.device(args.device).type == "cuda"


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeat: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def env(args) -> dict:
    out = {"torch": torch.__version__, "device": args.device}
    if torch.device(args.device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(name=p.name, memory_gib=p.total_memory / 2**30, sms=p.multi_processor_count)
    return out


@torch.inference_mode()
def top2_margin(model, ids: list[int], device: str) -> float:
    """The gap between the target's two largest next-token logits after `ids` (one prefill)."""
    from dflash_ray.worker.caches import PagedKVCache
    from dflash_ray.worker.layout import SeqSpan, build_layout

    d, n = model.cfg.decoder, len(ids)
    nb = (n + 15) // 16
    cache = PagedKVCache(d.num_layers, nb, 16, model.num_kv_heads, d.head_dim,
                         model.embed_tokens.weight.dtype, device)
    slots, groups = build_layout([SeqSpan(list(range(nb)), 0, n, n)], 16, True, device)
    hidden, _ = model(torch.tensor(ids, device=device), torch.arange(n, device=device), cache,
                      slots, groups)
    top = model.logits(hidden[-1:])[0].topk(2).values
    return float(top[0] - top[1]), float(top[0].abs())


def rounding_tolerance(dtype: str, top: float) -> float:
    """The widest top-2 margin that rounding can flip: 4 units in the last place of the top
    logit in this dtype (at least 1e-3); a divergence at a wider margin is a bug."""
    eps = torch.finfo(getattr(torch, dtype)).eps
    return max(1e-3, 4 * eps * top)


def lossless(args) -> dict:
    from tqdm import tqdm

    from dflash_ray import LLM
    from dflash_ray.benchmark.offline import closed_loop
    from dflash_ray.benchmark.prompts import bench_prompts
    from dflash_ray.core.sampling_params import SamplingParams
    from dflash_ray.demo import demo_pair

    target, drafter = demo_pair()
    prompts = bench_prompts(target, args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        common = dict(device=args.device, dtype=dtype, max_num_seqs=8, kv_cache_gb=1.0)
        # whole blocks at any batch size: CUDA's default, and on CPU (whose defaults decode
        # plain above 2 sequences) the only way this check drafts at all
        llms = {"plain": LLM(target, **common),
                "dflash": LLM(target, drafter, spec_profile="whole_block", **common)}
        # every prompt at once (batches of 8), compared prompt by prompt
        plain, spec = (llms[k].generate(prompts, params, use_tqdm=False) for k in llms)
        margins = []
        for p, s in zip(plain, spec, strict=True):
            if p.token_ids != s.token_ids:
                k = next((j for j, (a, b) in enumerate(zip(p.token_ids, s.token_ids, strict=False))
                          if a != b), min(len(p.token_ids), len(s.token_ids)))
                margin, top = top2_margin(llms["plain"].engine.executor.target.model,
                                          p.prompt_token_ids + p.token_ids[:k], args.device)
                margins.append({"margin": margin, "tolerance": rounding_tolerance(dtype, top)})
        row = {"identical": not margins, "mismatched_requests": len(margins),
               "top2_margin_at_divergence": margins,
               "tau": sum(t for o in spec for t in o.acceptance_lengths)
               / max(1, sum(len(o.acceptance_lengths) for o in spec))}
        for c in (1, 8):  # closed-loop timing at concurrency c
            runs = {}
            for name, llm in llms.items():
                closed_loop(llm.engine, prompts[:1], 1, params, tqdm(disable=True))  # warm-up
                runs[name] = closed_loop(llm.engine, prompts, c, params, tqdm(disable=True))
                runs[name].pop("outputs")
            row[f"c{c}"] = {
                "speedup": runs["dflash"]["tok_s"] / runs["plain"]["tok_s"],
                **{f"{k}_{m}": runs[k][m] for k in runs
                   for m in ("tok_s", "ms_per_step", "draft_ms_per_step", "verify_ms_per_step")},
            }
        for llm in llms.values():
            llm.engine.shutdown()
        del llms, plain, spec  # engines hold reference cycles: free their GPU memory now
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        out[dtype] = row
    wide = [(dt, m) for dt, r in out.items() for m in r["top2_margin_at_divergence"]
            if m["margin"] > m["tolerance"]]
    if wide:
        out["FAILED"] = f"greedy DFlash left plain decoding where the target was sure: {wide}"
    elif out["float32"]["tau"] < 1.5:
        out["FAILED"] = f"tau {out['float32']['tau']:.2f}: the drafter barely drafts"
    return out


@torch.inference_mode()
def hf_parity(args) -> dict:
    from transformers import AutoModelForCausalLM

    from dflash_ray.demo import demo_pair
    from dflash_ray.models.qwen3 import Qwen3Target
    from dflash_ray.worker.caches import PagedKVCache
    from dflash_ray.worker.layout import SeqSpan, build_layout

    target, _ = demo_pair()
    dev = args.device
    ids = torch.arange(64, device=dev) * 37 % 4000 + 5
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(dev).eval()
    want = hf(ids[None]).logits[0].float()
    ours = Qwen3Target.from_pretrained(target, torch.float32, dev)
    d = ours.cfg.decoder
    cache = PagedKVCache(d.num_layers, 4, 16, ours.num_kv_heads, d.head_dim, torch.float32, dev)
    slots, groups = build_layout([SeqSpan([0, 1, 2, 3], 0, 64, 64)], 16, causal=True, device=dev)
    hidden, _ = ours(ids, torch.arange(64, device=dev), cache, slots, groups)
    got = ours.logits(hidden)
    diff = float((got - want).abs().max())
    out = {"max_abs_logit_diff": diff, "argmax_equal": bool((got.argmax(-1) == want.argmax(-1))
                                                            .all())}
    if diff > 1e-3:
        out["FAILED"] = f"logits differ by {diff:.2e} (> 1e-3)"
    return out


def _write_configs(root: Path, shape: dict, drafter: dict) -> tuple[Path, Path]:
    t, dr = root / "target", root / "drafter"
    t.mkdir(), dr.mkdir()
    (t / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "eos_token_id": 0, **shape}))
    (dr / "config.json").write_text(json.dumps({
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "rms_norm_eps": 1e-6,
        **{k: v for k, v in shape.items() if k != "num_hidden_layers"},
        "num_hidden_layers": drafter["num_hidden_layers"], "block_size": drafter["block_size"],
        "num_target_layers": shape["num_hidden_layers"],
        "dflash_config": {"target_layer_ids": drafter["target_layer_ids"], "mask_token_id": 1}}))
    return t, dr


def _random(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(dtype).to_empty(device=device)  # allocated in dtype: half the peak
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.rope.to(device)
    return model.eval()


def graph_timings(args, target, cache, tables, ctx: int, scratch: int, layer_ids) -> dict:
    """`timing`'s target steps replayed from CUDA graphs: with the host's layout and padding
    (`_graph_ms`, what a step costs) and the replay alone (`_replay_ms`)."""
    from dflash_ray.ops import OPS
    from dflash_ray.worker.graphs import (
        StepGraphs,
        attention_group,
        graph_shape,
        make_buckets,
        padded_inputs,
    )
    from dflash_ray.worker.layout import SeqSpan

    if not cuda(args) or "triton" not in OPS.paged_attention.__qualname__:
        return {"graphs": "off: CUDA graphs need CUDA and the Triton paged attention"}
    dev, blen = args.device, 16

    def forward(inputs):
        hidden, _ = target(inputs["input_ids"], inputs["positions"], cache, inputs["write_slots"],
                           [attention_group(inputs)], capture=layer_ids)
        return target.logits(hidden)

    step_graphs, out = StepGraphs(forward), {}
    for b, q in ((1, 1), (8, 1), (32, 1), (1, 16)):
        spans = [SeqSpan(tables[i], ctx, q, q) for i in range(b)]
        shape = graph_shape(spans, make_buckets(len(tables)), len(tables[0]) * blen)
        ids = torch.randint(5, target.cfg.vocab_size, (b * q,)).tolist()
        pos = [p for _ in range(b) for p in range(ctx, ctx + q)]
        name = f"decode_b{b}" if q == 1 else f"verify{q}_b{b}"
        out[f"{name}_graph_ms"] = median_ms(
            lambda spans=spans, ids=ids, pos=pos, shape=shape: step_graphs.run(
                shape, padded_inputs(spans, ids, pos, shape, scratch, blen, True, dev)),
            dev, args.repeat)
        inputs = padded_inputs(spans, ids, pos, shape, scratch, blen, True, dev)
        out[f"{name}_replay_ms"] = median_ms(
            lambda shape=shape, inputs=inputs: step_graphs.run(shape, inputs), dev, args.repeat)
    return out


@torch.inference_mode()
def timing(args) -> dict:
    """Step times of a model of Qwen3-8B's shape against the floor of reading its weights."""
    from dflash_ray.models.dflash import DFlashDrafter
    from dflash_ray.models.hf_config import DrafterConfig, TargetConfig
    from dflash_ray.models.qwen3 import Qwen3Target
    from dflash_ray.worker.caches import PagedKVCache
    from dflash_ray.worker.layout import SeqSpan, build_layout, drafter_layout, slot_mapping

    dev, dtype, blen, ctx = args.device, torch.bfloat16, 16, args.context
    shape, dshape = (SMALL, DRAFTER_SMALL) if args.small else (QWEN3_8B, DRAFTER_8B)
    with tempfile.TemporaryDirectory() as root:
        tdir, ddir = _write_configs(Path(root), shape, dshape)
        tcfg, dcfg = TargetConfig.load(tdir), DrafterConfig.load(ddir)
    with torch.device("meta"):
        target, drafter = Qwen3Target(tcfg), DFlashDrafter(dcfg)
    target, drafter = _random(target, dev, dtype), _random(drafter, dev, dtype)
    # what a step reads: every weight but the embedding (one row per token) and, for the
    # drafter's pass, not `fc` (it projects context features, outside the pass)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in target.named_parameters()
                       if not n.startswith("embed_tokens"))
    draft_bytes = sum(p.numel() * p.element_size() for n, p in drafter.named_parameters()
                      if not n.startswith("fc."))
    # the copy bandwidth this device reaches (read + write), the floor's denominator
    big = torch.empty(256 * 2**20 if args.small else 2**30, dtype=torch.uint8, device=dev)
    copy_ms = median_ms(big.clone, dev, 10)
    bandwidth = 2 * big.numel() / (copy_ms / 1000)
    del big
    d = tcfg.decoder
    batches = (1, 8, 32)
    per_seq = (ctx + 16 + blen - 1) // blen
    scratch = per_seq * max(batches)  # one more block: where graphs' pad rows write
    cache = PagedKVCache(d.num_layers, scratch + 1, blen, target.num_kv_heads, d.head_dim, dtype,
                         dev)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(max(batches))]
    layer_ids = dcfg.target_layer_ids
    # prefill every sequence's context once (features of sequence 0 feed the drafter)
    feats = None
    for i, table in enumerate(tables):
        slots, groups = build_layout([SeqSpan(table, 0, ctx, ctx)], blen, True, dev)
        ids = torch.randint(5, tcfg.vocab_size, (ctx,), device=dev)
        _, f = target(ids, torch.arange(ctx, device=dev), cache, slots, groups,
                      capture=layer_ids if i == 0 else None)
        feats = f if i == 0 else feats

    def target_step(batch: int, q: int):
        spans = [SeqSpan(tables[i], ctx, q, q) for i in range(batch)]
        slots, groups = build_layout(spans, blen, True, dev)
        ids = torch.randint(5, tcfg.vocab_size, (batch * q,), device=dev)
        pos = torch.arange(ctx, ctx + q, device=dev).repeat(batch)
        hidden, _ = target(ids, pos, cache, slots, groups, capture=layer_ids)
        target.logits(hidden)

    kv_per_token = d.num_layers * 2 * target.num_kv_heads * d.head_dim * 2  # bf16 K and V

    def floor_ms(batch: int) -> float:  # weights once, plus every sequence's cached K/V
        return 1000 * (weight_bytes + batch * ctx * kv_per_token) / bandwidth

    out = {"target_step_weights_gb": weight_bytes / 1e9, "drafter_pass_weights_gb":
           draft_bytes / 1e9, "copy_bandwidth_tb_s": bandwidth / 1e12, "context": ctx}
    for b in batches:
        ms = median_ms(lambda b=b: target_step(b, 1), dev, args.repeat)
        out[f"decode_b{b}_ms"] = ms
        out[f"decode_b{b}_floor_ms"] = floor_ms(b)
        out[f"decode_b{b}_vs_floor"] = ms / floor_ms(b)
    out["verify16_b1_ms"] = median_ms(lambda: target_step(1, 16), dev, args.repeat)
    out["verify16_over_decode_b1"] = out["verify16_b1_ms"] / out["decode_b1_ms"]
    out.update(graph_timings(args, target, cache, tables, ctx, scratch, layer_ids))
    if "decode_b1_graph_ms" in out:
        out["decode_b1_graph_vs_floor"] = out["decode_b1_graph_ms"] / floor_ms(1)
        out["verify16_over_decode_b1_graph"] = (out["verify16_b1_graph_ms"]
                                                / out["decode_b1_graph_ms"])
    # the drafter: context K/V materialized once, then one pass over [bonus, MASK x 15]
    dd = dcfg.decoder
    dcache = PagedKVCache(dd.num_layers, per_seq, blen, dd.num_kv_heads, dd.head_dim, dtype, dev)
    table = list(range(per_seq))
    drafter.materialize_context(feats, torch.arange(ctx, device=dev),
                                slot_mapping([SeqSpan(table, 0, ctx, 0)], blen, dev), dcache)
    B = dcfg.block_size
    slots, groups = drafter_layout([SeqSpan(table, ctx, B, B)], blen, drafter.attention_kinds(),
                                   dev)
    block = target.embed(torch.full((B,), 1, device=dev))
    pos = torch.arange(ctx, ctx + B, device=dev)
    out["draft_pass_ms"] = median_ms(
        lambda: target.logits(drafter(block, pos, dcache, slots, groups)[1:]), dev, args.repeat)
    dkv = dd.num_layers * 2 * dd.num_kv_heads * dd.head_dim * 2
    out["draft_floor_ms"] = 1000 * (draft_bytes + target.lm_head.weight.numel() * 2
                                    + ctx * dkv) / bandwidth
    # what one DFlash step costs in plain steps: (draft + verify) / decode at batch 1
    out["dflash_step_in_plain_steps"] = ((out["draft_pass_ms"] + out["verify16_b1_ms"])
                                         / out["decode_b1_ms"])
    below = [k for k in out if k.endswith("_vs_floor") and out[k] < 0.9]
    if out["draft_pass_ms"] < 0.9 * out["draft_floor_ms"]:
        below.append("draft_pass_ms")
    if below and not args.small:  # (small weights fit in caches: no floor from memory)
        out["FAILED"] = f"faster than reading the weights allows, a measurement bug: {below}"
    return out


def train(args) -> dict:
    from dflash_ray.demo import demo_pair
    from dflash_ray.train.train_drafter import DrafterTrainArgs
    from dflash_ray.train.train_drafter import train as train_drafter

    target, _ = demo_pair()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        out = train_drafter(DrafterTrainArgs(
            target=target, out=str(Path(root) / "d"), num_layers=2, target_layer_ids=[1, 2, 3],
            num_seqs=64, heldout_seqs=8, response_tokens=96, num_anchors=32, batch_seqs=8,
            lr=1e-3, minutes=None, steps=args.train_steps, eval_every=max(1, args.train_steps // 4),
            device=args.device, features="online", threads=1))
        wall = time.perf_counter() - t0
        log = json.loads((out / "train_log.json").read_text())["log"]
    result = {"wall_s": wall, "step_s": 60 * log[-1]["minutes"] / log[-1]["step"],
              "train_loss": [e["train_loss"] for e in log],
              "heldout_loss": [e["heldout_loss"] for e in log]}
    if len(log) < 2:
        result["FAILED"] = f"{len(log)} evaluation(s) logged: run >= 2 --train-steps"
    elif not log[-1]["heldout_loss"] < log[0]["heldout_loss"]:
        result["FAILED"] = "held-out loss did not decrease"
    return result


def ragged_spans(rng: random.Random, num_seqs: int, q: int, extra_new: int, context: int,
                 blen: int, first_block: int = 1):
    """Sequences of ragged cached lengths (odd, up to `context`) on shuffled, disjoint blocks."""
    from dflash_ray.worker.layout import SeqSpan

    need = [(c, (c + q + extra_new + blen - 1) // blen)
            for c in (rng.randrange(context // 2, context) | 1 for _ in range(num_seqs))]
    pool = list(range(first_block, first_block + sum(n for _, n in need)))
    rng.shuffle(pool)
    spans = []
    for cached, n in need:
        table, pool = pool[:n], pool[n:]
        spans.append(SeqSpan(table, cached, q + extra_new, q))
    return spans


@torch.inference_mode()
def kernels(args) -> dict:
    """Each Triton kernel against its reference on the device, and their times (bf16)."""
    interpreted = not cuda(args)
    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "needs CUDA, or TRITON_INTERPRET=1 for a dry run on CPU (the kernels' "
                           "numerics on CPU are tests/test_kernels.py)"}
    import dflash_kernels

    if interpreted:
        from dflash_kernels.interpret import patch_interpreter

        patch_interpreter()
    from dflash_kernels import attention, elementwise, intake
    from dflash_ray.ops import OPS, reference
    from dflash_ray.worker.layout import SeqSpan, build_layout

    dev, blen = args.device, 16
    nh, nkv, hd = (4, 2, 64) if args.small else (32, 8, 128)
    out: dict = {"registry": {n: getattr(OPS, n).__qualname__ for n in dflash_kernels.KERNELS}}
    # (the interpreter's dry run: the registry rightly keeps the references on CPU)
    missing = [] if interpreted else [n for n, q in out["registry"].items() if "triton" not in q]
    out["interpreted"] = interpreted
    # fp32: IEEE dots in the kernel, fp32 SDPA in the reference: rounding of sums, ~1e-6; bf16:
    # one rounding of the output (2^-9) and tf32 probabilities (2^-11) against the exact answer
    tol = {torch.float32: 2e-4, torch.bfloat16: 2e-2}
    rng = random.Random(0)
    ctx = args.context
    cases = {
        "decode_b32": (ragged_spans(rng, 32, 1, 0, ctx, blen), True),
        "verify16_b8": (ragged_spans(rng, 8, 16, 0, ctx, blen), True),
        "drafter16_b8": (ragged_spans(rng, 8, 16, 3, ctx, blen), False),
        "prefill_and_decodes": ([SeqSpan(list(range(1, 1 + (ctx + blen - 1) // blen)), 0, ctx,
                                         ctx)] + ragged_spans(rng, 4, 1, 0, ctx, blen, 1000),
                                True),
    }
    errors, worst = {}, []
    for name, (spans, causal) in cases.items():
        slots = blen * (1 + max(b for s in spans for b in s.block_table))
        _, groups = build_layout(spans, blen, causal, dev)
        t = sum(s.num_queries for s in spans)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=dev).manual_seed(1)
            q = torch.randn(t, nh, hd, device=dev, generator=g).to(dtype)
            kc = torch.randn(slots, nkv, hd, device=dev, generator=g).to(dtype)
            vc = torch.randn(slots, nkv, hd, device=dev, generator=g).to(dtype)
            want = reference.paged_attention(q.float(), kc.float(), vc.float(), groups, hd**-0.5)
            got = attention.paged_attention(q, kc, vc, groups, hd**-0.5)
            err = float((got.float() - want).abs().max())
            key = f"paged_attention_{name}_{str(dtype)[6:]}"
            errors[key] = err
            if err > tol[dtype]:
                worst.append(key)
            if dtype == torch.bfloat16:
                out[f"{name}_kernel_ms"] = median_ms(
                    lambda q=q, kc=kc, vc=vc, groups=groups: attention.paged_attention(
                        q, kc, vc, groups, hd**-0.5), dev, args.repeat)
                out[f"{name}_reference_ms"] = median_ms(
                    lambda q=q, kc=kc, vc=vc, groups=groups: reference.paged_attention(
                        q, kc, vc, groups, hd**-0.5), dev, args.repeat)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=dev).manual_seed(2)
        tag = str(dtype)[6:]
        x = torch.randn(512, nh + 2 * nkv, hd, device=dev, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(nh + nkv, hd, device=dev, generator=g)).to(dtype)
        xs = x[:, : nh + nkv]
        pairs = {"rms_norm_heads": (elementwise.rms_norm(xs, w, 1e-6),
                                    reference.rms_norm(xs, w, 1e-6))}
        h = torch.randn(512, nh * hd, device=dev, generator=g).to(dtype)
        wh = torch.ones(nh * hd, device=dev, dtype=dtype)
        pairs["rms_norm_hidden"] = (elementwise.rms_norm(h, wh, 1e-6),
                                    reference.rms_norm(h, wh, 1e-6))
        cos, sin = reference.RotaryTable(hd, 1e6).to(dev)(
            torch.arange(512, device=dev) * 7, dtype)
        roped = elementwise.rms_norm(xs, w, 1e-6)
        pairs["apply_rope"] = (elementwise.apply_rope(roped, cos, sin),
                               reference.apply_rope(roped, cos, sin))
        caches = [torch.zeros(2048, nkv, hd, device=dev, dtype=dtype) for _ in range(4)]
        slots = torch.randperm(2048, device=dev)[:512]
        elementwise.store_kv(caches[0], caches[1], slots, x[:, nh:nh + nkv], x[:, nh + nkv:])
        reference.store_kv(caches[2], caches[3], slots, x[:, nh:nh + nkv], x[:, nh + nkv:])
        pairs["store_kv"] = (torch.cat(caches[:2]), torch.cat(caches[2:]))
        # the drafter's intake of 64 context rows into 2 layers (features of 5 target layers)
        hidden = nh * hd
        feats = torch.randn(64, 5 * hidden, device=dev, generator=g).to(dtype)
        fc = (0.01 * torch.randn(hidden, 5 * hidden, device=dev, generator=g)).to(dtype)
        layers = [reference.IntakeLayer(
            (0.02 * torch.randn(2 * nkv * hd, hidden, device=dev, generator=g)).to(dtype), None,
            (1 + 0.1 * torch.randn(hd, device=dev, generator=g)).to(dtype)) for _ in range(2)]
        kv = [[torch.zeros(256, nkv, hd, device=dev, dtype=dtype) for _ in range(2)]
              for _ in range(4)]
        slots = torch.randperm(256, device=dev)[:64]
        intake_args = (feats, fc, torch.ones(hidden, device=dev, dtype=dtype), 1e-6, layers,
                       nkv, cos[:64], sin[:64])
        intake.context_intake(*intake_args, kv[:2], slots)
        reference.context_intake(*intake_args, kv[2:], slots)
        pairs["context_intake"] = (torch.cat([c for layer in kv[:2] for c in layer]),
                                   torch.cat([c for layer in kv[2:] for c in layer]))
        for name, (got, want) in pairs.items():
            key = f"{name}_{tag}"
            got, want = got.float(), want.float()
            errors[key] = float((got - want).abs().max())
            # the reference's roundings: at most one ulp apart where the fp32 intermediates
            # differ in their last bit (bf16: 2^-8 relative); a copy is exact
            limit = 0.0 if name == "store_kv" else 1e-5 if dtype == torch.float32 else 1e-2
            if not torch.allclose(got, want, rtol=limit, atol=limit):
                worst.append(key)
    out["max_abs_error"] = errors
    if missing or worst:
        out["FAILED"] = f"registry kept references for {missing}; outside tolerance: {worst}"
    return out


def _graph_target(args, dtype):
    """A random target (the small shape, or Qwen3-8B's widths on 4 layers) for graph checks."""
    from dflash_ray.models.hf_config import TargetConfig
    from dflash_ray.models.qwen3 import Qwen3Target

    shape = dict(SMALL if args.small else QWEN3_8B, num_hidden_layers=4)
    with tempfile.TemporaryDirectory() as root:
        tdir, _ = _write_configs(Path(root), shape, DRAFTER_SMALL)
        cfg = TargetConfig.load(tdir)
    with torch.device("meta"):
        target = Qwen3Target(cfg)
    return _random(target, args.device, dtype)


@torch.inference_mode()
def graphs(args) -> dict:
    """Decode (q = 1) and verify (q = 16) steps of 5 ragged sequences, eager and unpadded vs
    padded to bucket 8 and replayed from one CUDA graph per shape, four steps each."""
    from dflash_ray.ops import OPS
    from dflash_ray.worker.caches import PagedKVCache
    from dflash_ray.worker.graphs import (
        StepGraphs,
        attention_group,
        cuda_graph_capture,
        eager_replay,
        graph_shape,
        make_buckets,
        padded_inputs,
    )
    from dflash_ray.worker.layout import SeqSpan, build_layout

    if cuda(args) and "triton" not in OPS.paged_attention.__qualname__:
        return {"FAILED": "the registry kept the reference paged_attention, which syncs with the "
                          "host (boolean indexing) and cannot be captured"}
    # on CPU a dry run of the same steps, with the eager stand-in for capture
    capture = cuda_graph_capture if cuda(args) else eager_replay
    dev, blen, out = args.device, 16, {"capture": capture.__name__}
    for dtype in (torch.float32, torch.bfloat16):
        target = _graph_target(args, dtype)
        d = target.cfg.decoder
        g = torch.Generator().manual_seed(0)
        lens = [37, 5, 130, 64, 17]
        per_seq = (max(lens) + 8 * 16 + blen - 1) // blen
        scratch = 5 * per_seq
        caches = [PagedKVCache(d.num_layers, scratch + 1, blen, target.num_kv_heads, d.head_dim,
                               dtype, dev) for _ in range(2)]
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(5)]
        spans = [SeqSpan(t, 0, n, n) for t, n in zip(tables, lens, strict=True)]
        slots, groups = build_layout(spans, blen, True, dev)
        ids = torch.randint(5, target.cfg.vocab_size, (sum(lens),), generator=g).to(dev)
        pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
        for c in caches:
            target(ids, pos, c, slots, groups)

        def forward(inputs, cache=caches[1], target=target):
            hidden, _ = target(inputs["input_ids"], inputs["positions"], cache,
                               inputs["write_slots"], [attention_group(inputs)])
            return target.logits(hidden)

        step_graphs = StepGraphs(forward, capture)
        worst, same = 0.0, True
        for q in (1, 16, 1, 16, 16, 1, 1, 16):
            spans = [SeqSpan(t, n, q, q) for t, n in zip(tables, lens, strict=True)]
            ids = torch.randint(5, target.cfg.vocab_size, (5 * q,), generator=g).tolist()
            pos = [p for n in lens for p in range(n, n + q)]
            slots, groups = build_layout(spans, blen, True, dev)
            hidden, _ = target(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                               caches[0], slots, groups)
            want = target.logits(hidden)
            shape = graph_shape(spans, make_buckets(8), per_seq * blen)
            got = step_graphs.run(shape, padded_inputs(spans, ids, pos, shape, scratch, blen,
                                                       True, dev))[: 5 * q]
            worst = max(worst, float((got - want).abs().max()))
            same &= bool(torch.equal(got.argmax(-1), want.argmax(-1)))
            lens = [n + q for n in lens]
        out[str(dtype)[6:]] = {"max_abs_logit_diff": worst, "argmax_equal": same,
                               "graphs": len(step_graphs)}
        del target, caches, step_graphs
        gc.collect()
        if cuda(args):
            torch.cuda.empty_cache()
    # fp32: the same kernels on more (masked) key columns and more GEMM rows: rounding only
    # bf16: GEMMs over more rows may pick other cuBLAS kernels (other rounding), so a near tie
    # of a random model may flip; the logits must still agree to bf16 rounding
    limits = {"float32": 1e-3, "bfloat16": 0.25}
    bad = [k for k, limit in limits.items() if out[k]["max_abs_logit_diff"] > limit
           or (k == "float32" and not out[k]["argmax_equal"])]
    if bad:
        out["FAILED"] = f"graph replay differs from eager: {bad}"
    out["engine"] = _graph_engine(args)
    if "FAILED" in out["engine"]:
        out["FAILED"] = "; ".join(x for x in (out.get("FAILED"), out["engine"]["FAILED"]) if x)
    return out


def _graph_engine(args) -> dict:
    """The demo pair through the engine with `cuda_graphs` on (CPU: 'eager', the padded path
    without capture) against off, fp32, whole blocks: greedy tokens and acceptance lengths
    equal, ms per step at concurrency 1 and 8, and how many steps replayed a graph per pass
    (with each pass's mode: 'off' where it was refused)."""
    from tqdm import tqdm

    from dflash_ray import LLM
    from dflash_ray.benchmark.offline import closed_loop
    from dflash_ray.benchmark.prompts import bench_prompts
    from dflash_ray.core.sampling_params import SamplingParams
    from dflash_ray.demo import demo_pair

    target, drafter = demo_pair()
    prompts = bench_prompts(target, min(args.prompts, 8))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    graphed = "on" if cuda(args) else "eager"
    common = dict(device=args.device, dtype="float32", max_num_seqs=8, kv_cache_gb=1.0,
                  spec_profile="whole_block")
    llms = {mode: LLM(target, drafter, cuda_graphs=mode, **common) for mode in ("off", graphed)}
    outs = {mode: llm.generate(prompts, params, use_tqdm=False) for mode, llm in llms.items()}
    out = {"mode": graphed,
           "identical": [o.token_ids for o in outs[graphed]] == [o.token_ids for o in outs["off"]],
           "same_acceptance": [o.acceptance_lengths for o in outs[graphed]]
           == [o.acceptance_lengths for o in outs["off"]]}
    for c in (1, 8):
        for mode, llm in llms.items():
            closed_loop(llm.engine, prompts[:1], 1, params, tqdm(disable=True))  # warm-up
            run = closed_loop(llm.engine, prompts, c, params, tqdm(disable=True))
            out[f"c{c}_{mode}"] = {m: run[m] for m in ("tok_s", "ms_per_step",
                                                        "draft_ms_per_step",
                                                        "verify_ms_per_step")}
        out[f"c{c}_verify_speedup"] = (out[f"c{c}_off"]["verify_ms_per_step"]
                                       / out[f"c{c}_{graphed}"]["verify_ms_per_step"])
    ex = llms[graphed].engine.executor
    out["target_graphs"] = {"mode": ex.target.graphs.mode, **ex.target.graphs.stats}
    out["drafter_graphs"] = {"mode": ex.drafter.graphs.mode, **ex.drafter.graphs.stats}
    for llm in llms.values():
        llm.engine.shutdown()
    del llms, ex
    gc.collect()
    if cuda(args):
        torch.cuda.empty_cache()
    # the demo target is an MoE: refused under capture (its MoE sorts on the host), so on
    # CUDA only the drafter's pass rides graphs; a pass that was not refused must have replayed
    idle = [name for name in ("target_graphs", "drafter_graphs")
            if out[name]["mode"] != "off" and out[name]["replays"] == 0]
    if not out["identical"]:
        out["FAILED"] = f"greedy tokens with cuda_graphs={graphed!r} differ from off"
    elif out["drafter_graphs"]["mode"] == "off" or idle:
        out["FAILED"] = f"cuda_graphs={graphed!r}: no step replayed a graph in {idle or 'drafter'}"
    return out


def _pair_rank(rank: int, port: int, backend: str, device: str, rounds: int, shapes: dict,
               results) -> None:
    """One side of the drafter-target pair: rank 0 (target) sends the hidden-state features,
    rank 1 (drafter) answers with a draft block, `rounds` times; both check what they got."""
    from dflash_ray.parallel.communicator import GroupCommunicator, connect_store

    try:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        comm = GroupCommunicator(rank, 2)
        store = connect_store("127.0.0.1", port, 30)
        comm.connect(backend, store, f"pair_{backend}", 30, device=device)
        # gloo moves host memory: GPU tensors are staged through it, as the drafter channel does
        wire = "cpu" if backend == "gloo" else device
        g = torch.Generator().manual_seed(0)
        features = torch.randn(shapes["features"], generator=g).to(torch.bfloat16).to(device)
        drafts = torch.randint(0, 150000, shapes["drafts"], generator=g).float().to(device)
        bufs = [torch.empty(x.shape, dtype=x.dtype, device=wire) for x in (features, drafts)]
        times, ok = [], True
        for _ in range(rounds):
            sync(device)
            t = time.perf_counter()
            for src, (x, buf) in enumerate(zip((features, drafts), bufs, strict=True)):
                if rank == src:
                    comm.broadcast(x.to(wire), src)
                else:
                    ok &= bool(torch.equal(comm.broadcast(buf, src).to(device), x))
            sync(device)
            times.append(time.perf_counter() - t)
        comm.close()
        results.put((rank, {"ok": ok, "round_trip_ms": 1000 * statistics.median(times[1:])}))
    except Exception as exc:
        results.put((rank, {"error": f"{type(exc).__name__}: {exc}"[:600]}))


def _pair(backend: str, devices: list[str], rounds: int, shapes: dict) -> dict:
    import torch.multiprocessing as mp

    from dflash_ray.parallel.communicator import open_store

    ctx = mp.get_context("spawn")
    store, port = open_store("127.0.0.1", 30)
    results = ctx.Queue()
    procs = [ctx.Process(target=_pair_rank, args=(r, port, backend, devices[r], rounds, shapes,
                                                  results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            rank, r = results.get(timeout=90)  # start (imports, CUDA) + 30 s to connect
            got[f"rank{rank}"] = r
    except Exception as exc:
        got["error"] = f"no answer from every rank: {type(exc).__name__}"
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    del store
    return {"devices": devices, **got}


def nccl(args) -> dict:
    """The drafter-target exchange between two processes, without Ray."""
    h = 256 if args.small else 4096
    k = len((DRAFTER_SMALL if args.small else DRAFTER_8B)["target_layer_ids"])
    # a verify of 8 decodes' 16-token blocks: 128 feature rows; drafts [8, 15] as fp32
    shapes = {"features": (128, k * h), "drafts": (8 * 15,)}
    out = {"feature_bytes": 128 * k * h * 2}
    if cuda(args):
        n = torch.cuda.device_count()
        devices = ["cuda:0", "cuda:1"] if n > 1 else ["cuda:0", "cuda:0"]
        out["nccl"] = _pair("nccl", devices, args.repeat, shapes)
        out["gloo_staged"] = _pair("gloo", ["cuda:0", "cuda:0"], args.repeat, shapes)
    else:
        out["nccl"] = {"skipped": "needs CUDA"}
        out["gloo_staged"] = _pair("gloo", ["cpu", "cpu"], args.repeat, shapes)
    devices = out["nccl"].get("devices", [])
    errors = [r.get("error", "") for r in out["nccl"].values() if isinstance(r, dict)]
    # NCCL (>= 2.5) refuses two ranks of one communicator on one GPU: expected, not a failure
    refused = len(set(devices)) == 1 and any("Duplicate GPU" in e or "invalid usage" in e
                                               for e in errors)
    if refused:
        out["nccl"]["note"] = ("NCCL refuses two ranks on one GPU; there the drafter channel "
                               "runs gloo, staged through host memory (gloo_staged)")
    failed = [name for name in ("nccl", "gloo_staged")
              if "skipped" not in out[name] and not (name == "nccl" and refused)
              and not all(out[name].get(f"rank{r}", {}).get("ok") for r in (0, 1))]
    if failed:
        out["FAILED"] = f"the exchange failed over {failed}"
    return out


def qwen35(args) -> dict:
    import qwen35_check  # bench/, beside this script

    return qwen35_check.run(args, median_ms)


def fla(args) -> dict:
    import fla_check  # bench/, beside this script

    return fla_check.run(args, median_ms)


def moe(args) -> dict:
    import moe_check  # bench/, beside this script

    return moe_check.run(args, median_ms)


SECTIONS = {"env": env, "kernels": kernels, "graphs": graphs, "nccl": nccl,
            "lossless": lossless, "hf_parity": hf_parity, "timing": timing, "train": train,
            "qwen35": qwen35, "fla": fla, "moe": moe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small timing shapes (CPU runs)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    results: dict = {"args": vars(args), "dflash_kernels": use_this_checkout()}
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args)
        except Exception:
            results[name] = {"FAILED": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
        print(name, json.dumps(results[name], default=str)[:2000], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    failed = [n for n in args.sections if "FAILED" in results[n]]
    print("FAILED: " + ", ".join(failed) if failed else "all sections passed")
    os._exit(1 if failed else 0)  # engines' daemon threads must not hold the exit


if __name__ == "__main__":
    main()
