"""In-process engine vs the Ray executor (drafter actor + 1 target shard, and + 2 shards).

Closed loop at each concurrency c (c requests in flight, a new one joins when one finishes),
greedy, same prompts for every setup; each Ray setup's rounds alternate with the in-process
engine's (`--rounds`, default 3), the ratio is over their summed tokens and seconds. Reports
output tok/s, the Ray / in-process ratio (and per round), and the mean per-step time split into
draft, verify, transfer (drafts to the target + features back) and Ray overhead (actor-call
dispatch, pickling, waiting on results, skew between actors).

    python3 bench/ray_executor.py                 # the demo pair, or random models of its shape
    python3 bench/ray_executor.py --target DIR --drafter DIR --concurrency 1 8 --shards 1 2
    python3 bench/ray_executor.py --shards 1 --step-calls connections actor_calls  # A/B
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop, summarize  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.engine import Engine  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402


def random_pair(root: Path) -> tuple[str, str]:
    """Random checkpoints of the demo pair's shape (4-layer Qwen3-MoE, hidden 192, 8 experts
    top-2, vocab 4096; 2-layer drafter, B = 16): the compute and the transfers are the demo's,
    acceptance is not (a random drafter is almost never accepted)."""
    from dflash import DFlashDraftModel
    from transformers import Qwen3Config, Qwen3MoeConfig, Qwen3MoeForCausalLM

    target, drafter = root / "target", root / "drafter"
    shape = dict(
        vocab_size=4096,
        hidden_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **shape,
            num_hidden_layers=4,
            intermediate_size=640,
            moe_intermediate_size=320,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    ).save_pretrained(target)
    cfg = Qwen3Config(**shape, num_hidden_layers=2, intermediate_size=640)
    cfg.architectures = ["DFlashDraftModel"]
    cfg.block_size = 16
    cfg.num_target_layers = 4
    cfg.dflash_config = {"target_layer_ids": [1, 2], "mask_token_id": 4095}
    DFlashDraftModel(cfg).save_pretrained(drafter)
    return str(target), str(drafter)


def per_step_ms(engine: Engine, steps0: int, seconds: float, timing0) -> dict:
    """Mean milliseconds per engine step over the last closed loop."""
    steps = engine.stats().counters.num_steps - steps0
    row = {"steps": steps, "step_wall": 1e3 * seconds / steps}
    t = getattr(engine.executor, "timing", None)
    if t is None:
        row["draft"] = 1e3 * (engine.stats().counters.draft_seconds - timing0[0]) / steps
        row["verify"] = 1e3 * (engine.stats().counters.verify_seconds - timing0[1]) / steps
        return row
    n = t.steps - timing0.steps
    for key in ("draft", "verify", "transfer"):
        row[key] = 1e3 * (getattr(t, key) - getattr(timing0, key)) / n
    row["ray_overhead"] = 1e3 * (t.ray_overhead - timing0.ray_overhead) / n
    row["execute_wall"] = 1e3 * (t.wall - timing0.wall) / n
    return row


def summary(runs: list[dict], setup: str, c: int) -> dict:
    """One setup's rounds at one concurrency: summed counters, mean ms per step by steps."""
    row = summarize(runs)
    row.pop("tau_histogram"), row.pop("acceptance_rate_per_position")
    steps = sum(r["ms"]["steps"] for r in runs)
    keys = [k for k in runs[0]["ms"] if k != "steps"]
    row["ms_per_step"] = {"steps": steps} | {
        k: sum(r["ms"][k] * r["ms"]["steps"] for r in runs) / steps for k in keys}
    return row | {"setup": setup, "concurrency": c}


def snapshot(engine: Engine):
    t = getattr(engine.executor, "timing", None)
    if t is None:
        return (engine.stats().counters.draft_seconds, engine.stats().counters.verify_seconds)
    from dataclasses import replace

    return replace(t)


def run(args) -> dict:
    import ray

    if args.target:
        target, drafter = args.target, args.drafter
    else:
        try:
            from dflash_ray.demo import demo_pair

            target, drafter = demo_pair()
        except ValueError:
            target, drafter = random_pair(Path(tempfile.mkdtemp(prefix="dflash-bench-")))
    torch.set_num_threads(1)  # each actor gets one thread too: the comparison is per process
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    prompts = bench_prompts(target, args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    remote = [
        (f"ray {n} shard{'s' * (n > 1)} ({calls.replace('_', ' ')})",
         {"executor": "ray", "num_target_shards": n, "cluster": {"step_calls": calls}})
        for n in args.shards for calls in args.step_calls
    ]
    top = max(args.concurrency)
    per_setup = len(args.concurrency) * len(prompts) * args.rounds * 2
    bar = tqdm(total=len(remote) * per_setup + (len(remote) + 1) * top, unit="req")

    def started(kw: dict) -> Engine:
        engine = make_engine(EngineConfig(target=target, drafter=drafter, max_num_seqs=top,
                                          num_kv_blocks=512, **kw))
        closed_loop(engine, prompts[:top], top, params, bar)  # untimed: first-use setup
        return engine

    def timed(engine: Engine, c: int) -> dict:
        steps0, timing0 = engine.stats().counters.num_steps, snapshot(engine)
        row = closed_loop(engine, prompts, c, params, bar)
        row["ms"] = per_step_ms(engine, steps0, row["seconds"], timing0)
        return row

    # The in-process engine stays up throughout; each Ray setup runs beside it, the two
    # alternating round by round (the one going first flips), so a drift in the box's speed
    # falls on both. Setups run one after another: an idle compiled graph spins its actors.
    local = started({})
    local_runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    result = {"target": target, "drafter": drafter, "max_tokens": args.max_tokens,
              "requests": args.requests, "rounds": args.rounds, "rows": []}
    for name, kw in remote:
        engine = started(kw)
        for c in args.concurrency:
            pairs = []
            for r in range(args.rounds):
                order = [(local, "in-process"), (engine, name)][:: 1 if r % 2 == 0 else -1]
                pairs.append({label: timed(e, c) for e, label in order})
            local_runs[c] += [p["in-process"] for p in pairs]
            row = summary([p[name] for p in pairs], name, c)
            row["vs_in_process"] = row["tok_s"] / summarize(
                [p["in-process"] for p in pairs])["tok_s"]
            row["ratio_per_round"] = [p[name]["tok_s"] / p["in-process"]["tok_s"]
                                      for p in pairs]
            row["outputs_identical"] = all(sorted(p[name]["outputs"])
                                           == sorted(p["in-process"]["outputs"]) for p in pairs)
            result["rows"].append(row)
            tqdm.write(f"{name:>27} c={c}: {row['tok_s']:7.1f} tok/s, "
                       f"{row['vs_in_process']:.2f}x in-process (rounds "
                       + ", ".join(f"{x:.2f}" for x in row["ratio_per_round"]) + "), "
                       + ", ".join(f"{k} {v:.2f}" for k, v in row["ms_per_step"].items()
                                   if k != "steps") + " ms/step")
        engine.shutdown()
    for c in args.concurrency:
        row = summary(local_runs[c], "in-process", c)
        result["rows"].insert(0, row | {"vs_in_process": 1.0, "outputs_identical": True})
    local.shutdown()
    bar.close()
    ray.shutdown()
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--step-calls", nargs="+", default=["connections"],
                    choices=["connections", "actor_calls", "compiled_graph"],
                    help="how steps reach the actors (cluster.step_calls), each a setup of its "
                    "own: the actors' step loops over connections (the default), one actor call "
                    "per actor per step, compiled graphs")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per setup and concurrency, alternated with the in-process "
                    "engine's")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", type=Path, help="write the result as JSON to this file")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if bool(args.target) != bool(args.drafter):
        ap.error("--target and --drafter go together")
    result = run(args)
    print()
    print(f"{'setup':>27} {'c':>2} {'tok/s':>8} {'vs in-proc':>10} {'same':>5}  ms/step")
    for r in result["rows"]:
        ms = r["ms_per_step"]
        print(
            f"{r['setup']:>27} {r['concurrency']:>2} {r['tok_s']:8.1f} "
            f"{r['vs_in_process']:10.2f} {str(r['outputs_identical']):>5}  "
            + " ".join(f"{k}={v:.2f}" for k, v in ms.items() if k != "steps")
        )
    for key in ("target", "drafter"):  # no machine's absolute paths in saved results
        if result.get(key) and os.path.isabs(result[key]):
            result[key] = os.path.relpath(result[key])
    if args.json:
        print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
