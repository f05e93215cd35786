"""gpu_check's `qwen35` section: a Qwen3.5-shaped verify step against its floor.

A random bf16 slice of Qwen3.5-35B-A3B (8 of its 40 layers in its pattern: 6 Gated DeltaNet,
2 gated attention; all 256 experts, top-8, the shared expert; its real vocabulary) with fp32
recurrent state: a decode step, a 16-token verify with every position kept, and one cut to 8
kept (the commit replays the recurrence over them), each after a `--context` prefill, against
the floor of reading what the step must read: the weights but the embedding, the experts its
tokens were routed to (counted), the KV cache and the recurrent state (read and written).
`--small` runs tiny widths (CPU).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

QWEN35_35B_SLICE = dict(
    num_hidden_layers=8, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, vocab_size=248320)
SMALL = dict(
    num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
    linear_value_head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, vocab_size=1024)


def _model(shape: dict, device: str):
    from dflash_ray.models.hf_config import TargetConfig
    from dflash_ray.models.qwen35 import Qwen35Target

    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "config.json").write_text(json.dumps({
            "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "eos_token_id": 0,
            "linear_conv_kernel_dim": 4, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                                "partial_rotary_factor": 0.25}, **shape}))
        cfg = TargetConfig.load(root)
    with torch.device("meta"):
        model = Qwen35Target(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0.0, 2.7)  # decay rates exp(A) in 1..16, as initialised for training
            elif name.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)  # the gated norm scales by its weight
            elif name.endswith(("norm.weight", "dt_bias")):
                p.zero_()  # the zero-centred norms scale by 1 + weight
            else:
                p.normal_(0.0, 0.02)
    model.rope.to(device)
    return model.eval()


@torch.inference_mode()
def run(args, median_ms) -> dict:
    from dflash_ray.ops import OPS, override
    from dflash_ray.worker.caches import Commit, ModelCache, StateRun
    from dflash_ray.worker.layout import SeqSpan, build_layout

    dev, blen, ctx = args.device, 16, args.context
    model = _model(SMALL if args.small else QWEN35_35B_SLICE, dev)
    cfg = model.cfg
    specs = model.cache_specs()
    per_seq = (ctx + 16 + blen - 1) // blen
    cache = ModelCache(specs, per_seq, blen, torch.bfloat16, dev, num_slots=1)
    table = list(range(per_seq))

    def forward(start: int, n: int, prefill: bool) -> None:
        slots, groups = build_layout([SeqSpan(table, start, n, n)], blen, True, dev)
        cache.plan_states([StateRun(torch.arange(n, device=dev)[None], [0], prefill)])
        ids = torch.randint(5, cfg.vocab_size, (n,), device=dev)
        hidden, _ = model(ids, torch.arange(start, start + n, device=dev), cache, slots, groups)
        model.logits(hidden[-1:] if prefill else hidden)

    forward(0, ctx, True)

    def step(q: int, kept: int) -> None:
        forward(ctx, q, False)
        cache.commit([Commit(0, ctx, q, kept)])

    hits: list[int] = []  # experts hit per MoE layer in one step

    def routed(logits, top_k, normalize, _impl=OPS.route_experts):
        weights, ids = _impl(logits, top_k, normalize)
        hits.append(int(ids.unique().numel()))
        return weights, ids

    expert_bytes = 3 * cfg.moe_intermediate_size * cfg.decoder.hidden_size * 2
    other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if not n.startswith("embed_tokens") and ".experts." not in n)
    kv_bytes = ctx * sum(s.bytes_per_token(torch.bfloat16) for s in specs)
    state_bytes = 2 * sum(s.bytes_per_seq(torch.bfloat16) for s in specs)  # read + write
    big = torch.empty(256 * 2**20 if args.small else 2**30, dtype=torch.uint8, device=dev)
    bandwidth = 2 * big.numel() / (median_ms(big.clone, dev, 10) / 1000)
    del big
    out = {"context": ctx, "state_bytes_per_seq": state_bytes // 2,
           "copy_bandwidth_tb_s": bandwidth / 1e12}
    for name, q, kept in (("decode", 1, 1), ("verify16", 16, 16), ("verify16_cut8", 16, 8)):
        hits.clear()
        with override("route_experts", routed):
            step(q, kept)
        floor = 1000 * (other_bytes + sum(hits) * expert_bytes + kv_bytes
                        + state_bytes) / bandwidth
        out[f"{name}_ms"] = median_ms(lambda q=q, kept=kept: step(q, kept), dev, args.repeat)
        out[f"{name}_floor_ms"] = floor
        out[f"{name}_vs_floor"] = out[f"{name}_ms"] / floor
        out[f"{name}_experts_hit"] = sum(hits)
    out["verify16_over_decode"] = out["verify16_ms"] / out["decode_ms"]
    below = [k for k in out if k.endswith("_vs_floor") and out[k] < 0.9]
    if below and not args.small:
        out["FAILED"] = f"faster than reading the weights allows, a measurement bug: {below}"
    return out
