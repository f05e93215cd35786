"""Decode and verify step time of our engine vs transformers' own model (DynamicCache), on one
tiny random Qwen3-MoE checkpoint, side by side in one run; plus plain decode tok/s at several
batch sizes. A benchmark, not a test: quote the ratios, not the absolute numbers.

    python3 bench/engine_vs_hf.py [--layers 6 --hidden 256 --experts 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from dflash_ray import LLM, SamplingParams
from dflash_ray.worker.layout import SeqSpan, build_layout


def make_checkpoint(path: str, layers: int, hidden: int, experts: int, vocab: int) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def hf_step_ms(path: str, context: int, block: int, repeat: int) -> float:
    """transformers: forward `block` new tokens on a DynamicCache of `context`, then crop back."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    model(torch.arange(context)[None] % 100, past_key_values=cache, use_cache=True)
    ids = torch.arange(block)[None] % 100 + 1

    def step():
        model(ids, past_key_values=cache, use_cache=True)
        cache.crop(-block)  # transformers 5: a negative count removes that many tokens

    return median_ms(step, repeat)


@torch.inference_mode()
def ours_step_ms(llm: LLM, context: int, block: int, repeat: int) -> float:
    """Our runner: the same forward (layout + target + logits of every block row) on a paged
    cache already holding `context` positions."""
    target = llm.engine.executor.target  # the TargetWorker
    blen = target.cfg.kv_block_len
    table = list(range((context + block + blen - 1) // blen))
    dev = target.device

    def forward(start: int, n: int) -> None:
        spans = [SeqSpan(table, start, n, n)]
        slots, groups = build_layout(spans, blen, causal=True, device=dev)
        ids = torch.arange(n, device=dev) % 100 + 1
        hidden, _ = target.model(
            ids, torch.arange(start, start + n, device=dev), target.cache, slots, groups
        )
        target.model.logits(hidden)

    forward(0, context)
    return median_ms(lambda: forward(context, block), repeat)


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """transformers' own `generate` on a loaded model: batch 1, greedy, exactly `max_tokens`
    new tokens a prompt (no EOS stop). Returns the seconds all prompts took and their tokens."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=model.config.pad_token_id or 0)
    seconds, outputs = 0.0, []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        start = time.perf_counter()
        out = model.generate(ids, generation_config=gen)
        seconds += time.perf_counter() - start
        outputs.append(out[0, len(prompt):].tolist())
    return seconds, outputs


def decode_tok_s(llm: LLM, batch: int, max_tokens: int) -> float:
    prompts = [[(i * 7 + j) % 100 + 1 for j in range(16)] for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # prefill, not counted
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, args.layers, args.hidden, args.experts, args.vocab)
        llm = LLM(d, max_num_seqs=64)
        rows = {}
        for block in (1, 16):
            hf = hf_step_ms(d, args.context, block, args.repeat)
            ours = ours_step_ms(llm, args.context, block, args.repeat)
            rows[f"step_{block}"] = {"ours_ms": ours, "hf_ms": hf, "ratio": ours / hf}
            print(
                f"{block:>2}-token step at context {args.context}: ours {ours:.2f} ms, "
                f"transformers {hf:.2f} ms, ours/theirs = {ours / hf:.2f}"
            )
        for batch in (1, 8, 32):
            tps = decode_tok_s(llm, batch, 32)
            rows[f"decode_tok_s_batch_{batch}"] = tps
            print(f"plain decode, batch {batch:>2}: {tps:.0f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
