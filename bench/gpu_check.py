"""The checks and timings that need a GPU, as one prepared run (everything else is tested on CPU).

Sections, each recorded in the JSON whether it passed, failed (with its traceback) or was
skipped, so one short run on a borrowed GPU brings back everything at once:

- lossless: the demo pair through the engine on the device, fp32 and bf16: greedy DFlash output
  token-for-token equal to plain decoding, tau, tok/s and ms per step at concurrency 1 and 8;
- hf_parity: our target's prefill logits vs transformers' own model on the device (fp32);
- timing: a random model of Qwen3-8B's shape (bf16) and a 5-layer drafter of z-lab's
  Qwen3-8B-DFlash-b16 shape: decode step at batch 1 / 8 / 32, a 16-token verify step and a
  drafter pass, each against the memory-bandwidth floor (weight bytes / measured copy bandwidth);
- train: `train-drafter` on the device for a few dozen steps (online features, bf16 target).

    python3 bench/gpu_check.py --out gpu_check.json                  # on the GPU machine
    python3 bench/gpu_check.py --device cpu --small --out check.json # the same code on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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
        llms = {"plain": LLM(target, **common), "dflash": LLM(target, drafter, **common)}
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


@torch.inference_mode()
def timing(args) -> dict:
    """Step times of a model of Qwen3-8B's shape against the floor of reading its weights."""
    from dflash_ray.models.dflash import DFlashDrafter
    from dflash_ray.models.hf_config import DrafterConfig, TargetConfig
    from dflash_ray.models.qwen3 import Qwen3Target
    from dflash_ray.worker.caches import PagedKVCache
    from dflash_ray.worker.layout import SeqSpan, build_layout, slot_mapping

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
    cache = PagedKVCache(d.num_layers, per_seq * max(batches), blen, target.num_kv_heads,
                         d.head_dim, dtype, dev)
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
    # the drafter: context K/V materialized once, then one pass over [bonus, MASK x 15]
    dd = dcfg.decoder
    dcache = PagedKVCache(dd.num_layers, per_seq, blen, dd.num_kv_heads, dd.head_dim, dtype, dev)
    table = list(range(per_seq))
    drafter.materialize_context(feats, torch.arange(ctx, device=dev),
                                slot_mapping([SeqSpan(table, 0, ctx, 0)], blen, dev), dcache)
    B = dcfg.block_size
    slots, groups = build_layout([SeqSpan(table, ctx, B, B)], blen, False, dev)
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


SECTIONS = {"env": env, "lossless": lossless, "hf_parity": hf_parity, "timing": timing,
            "train": train}


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
    results: dict = {"args": vars(args)}
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
