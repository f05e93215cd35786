"""`dflash-ray bench`: plain decoding vs DFlash on the same engine code, in one process and run.

Closed loop per concurrency level c: c requests in flight, a new one joins as soon as one
finishes (continuous batching). Reports output tok/s of both, the speedup, mean acceptance
length tau, the tau histogram and the acceptance rate per draft position; writes JSON and PNGs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..config import EngineConfig
from ..engine import Engine
from ..sampling_params import SamplingParams


def load_prompts(path: str | None, target: str, n: int) -> list:
    if path is None:
        from .prompts import bench_prompts

        return bench_prompts(target, n)
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                prompts.append(row.get("prompt", row.get("text", row.get("token_ids"))))
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (expected JSONL with a 'prompt' field)")
    return prompts[:n]


def closed_loop(engine: Engine, prompts: list, concurrency: int, params: SamplingParams,
                bar: tqdm) -> dict:
    before = engine.stats.spec
    drafts0, accepted0 = before.num_drafts, list(before.accepted_per_pos)
    proposed0 = before.num_draft_tokens
    s0 = engine.stats
    steps0, draft0, verify0 = s0.num_steps, s0.draft_seconds, s0.verify_seconds
    queue = list(reversed(prompts))
    live, finished = 0, []
    start = time.perf_counter()
    while queue or live:
        while queue and live < concurrency:
            engine.add_request(queue.pop(), params)
            live += 1
        for out in engine.step():
            if out.finished:
                live -= 1
                finished.append(out)
                bar.update(1)
    seconds = time.perf_counter() - start
    spec = engine.stats.spec
    drafts = spec.num_drafts - drafts0
    per_pos = [a - (accepted0[i] if i < len(accepted0) else 0)
               for i, a in enumerate(spec.accepted_per_pos)]
    taus = [t for o in finished for t in o.acceptance_lengths]
    tokens = sum(len(o.token_ids) for o in finished)
    steps = max(1, engine.stats.num_steps - steps0)
    return {
        "tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
        # where a step's time goes: the drafter's pass and the target's verify pass
        "ms_per_step": 1e3 * seconds / steps,
        "draft_ms_per_step": 1e3 * (engine.stats.draft_seconds - draft0) / steps,
        "verify_ms_per_step": 1e3 * (engine.stats.verify_seconds - verify0) / steps,
        "mean_tau": sum(taus) / len(taus) if taus else 0.0,
        "tau_histogram": dict(sorted(Counter(taus).items())),
        "acceptance_rate_per_position": [a / drafts for a in per_pos] if drafts else [],
        # drafts verified per verify step that carried any (< B-1 when blocks are cut)
        "mean_proposed": (spec.num_draft_tokens - proposed0) / drafts if drafts else 0.0,
        "outputs": [o.token_ids for o in finished],
    }


def run_bench(target: str, drafter: str, prompts: list, concurrency: list[int],
              max_tokens: int, out_dir: str | None, engine_kwargs: dict | None = None) -> dict:
    kw = dict(engine_kwargs or {})
    kw.setdefault("max_num_seqs", max(concurrency))
    # plain decoding is B = 1 and has no speculation settings
    plain_kw = {k: v for k, v in kw.items() if k != "block_size" and not k.startswith("spec_")}
    plain = Engine(EngineConfig(target=target, **plain_kw))
    spec = Engine(EngineConfig(target=target, drafter=drafter, **kw))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    rows = []
    total = 2 * len(prompts) * len(concurrency)
    with tqdm(total=total, desc="bench", unit="req") as bar:
        for c in concurrency:
            base = closed_loop(plain, prompts, c, params, bar)
            fast = closed_loop(spec, prompts, c, params, bar)
            same = sorted(base.pop("outputs")) == sorted(fast.pop("outputs"))
            rows.append({"concurrency": c, "plain": base, "dflash": fast,
                         "speedup": fast["tok_s"] / base["tok_s"], "outputs_identical": same})
            tqdm.write(f"c={c:>2}: plain {base['tok_s']:7.1f} tok/s, dflash "
                       f"{fast['tok_s']:7.1f} tok/s, speedup {fast['tok_s'] / base['tok_s']:.2f}x"
                       f", tau {fast['mean_tau']:.2f}, step {base['ms_per_step']:.2f} / "
                       f"{fast['ms_per_step']:.2f} ms, identical={same}")
    result = {"target": _shown(target), "drafter": _shown(drafter), "block_size": spec.block_size,
              "spec_min_confidence": spec.config.spec_min_confidence,
              "spec_max_batch": spec.config.spec_max_batch,
              "max_tokens": max_tokens, "num_prompts": len(prompts), "rows": rows}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=1))
        plot(result, out)
    return result


def _shown(path: str) -> str:
    """A path as results should record it: relative when under the working directory."""
    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["concurrency"] for r in rows], [r["speedup"] for r in rows], marker="o")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="concurrency", ylabel="DFlash / plain tok/s",
           title=f"speedup (B={result['block_size']})")
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=100)
    plt.close(fig)
    hist: Counter = Counter()
    for r in rows:
        hist.update({int(k): v for k, v in r["dflash"]["tau_histogram"].items()})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = list(range(1, result["block_size"] + 1))
    ax.bar(ks, [hist.get(k, 0) for k in ks])
    ax.set(xlabel="acceptance length tau (tokens per verify step)", ylabel="verify steps",
           title="tau histogram")
    fig.tight_layout()
    fig.savefig(out / "tau_histogram.png", dpi=100)
    plt.close(fig)
