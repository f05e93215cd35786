"""`dflash-ray bench`: plain decoding vs DFlash on the same engine code, in one process and run.

Closed loop per concurrency level c: c requests in flight, a new one joins as soon as one
finishes (continuous batching). Reports output tok/s of both, the speedup, mean acceptance
length tau, the tau histogram and the acceptance rate per draft position; writes JSON and PNGs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from itertools import zip_longest
from pathlib import Path

from tqdm import tqdm

from ..config import EngineConfig
from ..core.engine import Engine
from ..core.sampling_params import SamplingParams
from ..executors import make_engine


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
    """Run `prompts` through `engine` with `concurrency` requests in flight; the result's raw
    counters (see `summarize`) come with the figures derived from them."""
    s0 = engine.stats().counters
    spec0 = s0.spec
    drafts0, accepted0, proposed0 = spec0.num_drafts, list(spec0.accepted_per_pos), \
        spec0.num_draft_tokens
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
    st = engine.stats().counters
    spec = st.spec
    raw = {
        "seconds": seconds,
        "tokens": sum(len(o.token_ids) for o in finished),
        # tokens and steps after each request's first token (its prefill's)
        "decode_tokens": sum(max(0, len(o.token_ids) - 1) for o in finished),
        "decode_steps": sum(o.metrics.num_steps for o in finished),
        "steps": st.num_steps - steps0,
        "draft_seconds": st.draft_seconds - draft0,
        "verify_seconds": st.verify_seconds - verify0,
        "tau_histogram": dict(sorted(Counter(t for o in finished
                                             for t in o.acceptance_lengths).items())),
        "drafts": spec.num_drafts - drafts0,
        "accepted_per_position": [a - (accepted0[i] if i < len(accepted0) else 0)
                                  for i, a in enumerate(spec.accepted_per_pos)],
        "proposed": spec.num_draft_tokens - proposed0,
    }
    return {**summarize([raw]), "outputs": [o.token_ids for o in finished]}


RAW = ("seconds", "tokens", "decode_tokens", "decode_steps", "steps", "draft_seconds",
       "verify_seconds", "drafts", "proposed")


def summarize(runs: list[dict]) -> dict:
    """Add up the raw counters of runs (closed_loop results) and derive the figures:
    tok/s = all tokens / all seconds, so each run weighs by its duration."""
    raw = {k: sum(r[k] for r in runs) for k in RAW}
    hist: Counter = Counter()
    per_pos: list[int] = []
    for r in runs:
        hist.update({int(k): v for k, v in r["tau_histogram"].items()})
        acc = r["accepted_per_position"]
        per_pos = [a + b for a, b in zip_longest(per_pos, acc, fillvalue=0)]
    steps, drafts = max(1, raw["steps"]), raw["drafts"]
    return {
        **raw,
        "tau_histogram": dict(sorted(hist.items())),
        "accepted_per_position": per_pos,
        "tok_s": raw["tokens"] / raw["seconds"],
        # where a step's time goes: the drafter's pass and the target's verify pass
        "ms_per_step": 1e3 * raw["seconds"] / steps,
        "draft_ms_per_step": 1e3 * raw["draft_seconds"] / steps,
        "verify_ms_per_step": 1e3 * raw["verify_seconds"] / steps,
        # tokens a request commits per decode step (plain and cooldown steps count 1) ...
        "mean_tau": raw["decode_tokens"] / raw["decode_steps"] if raw["decode_steps"] else 0.0,
        # ... and per verify step that carried drafts (the acceptance length; the histogram
        # counts those steps only)
        "acceptance_length": 1 + sum(per_pos) / drafts if drafts else 0.0,
        "acceptance_rate_per_position": [a / drafts for a in per_pos] if drafts else [],
        # drafts verified per verify step that carried any (< B-1 when blocks are cut)
        "mean_proposed": raw["proposed"] / drafts if drafts else 0.0,
    }


def run_bench(target: str, drafter: str, prompts: list, concurrency: list[int],
              max_tokens: int, out_dir: str | None, engine_kwargs: dict | None = None,
              rounds: int = 3, metrics_port: int | None = None) -> dict:
    """Plain and DFlash engines side by side at each concurrency level, `rounds` times.

    Both engines first run one untimed request wave per level (the GEMM libraries set up per
    shape on first use). Each round runs both engines at every level, the engine going first
    alternating between rounds, so a drift in the machine's speed falls on both; a level's
    figures add up all its rounds, and `speedup_per_round` shows their spread."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    kw = dict(engine_kwargs or {})
    kw.setdefault("max_num_seqs", max(concurrency))
    # plain decoding is B = 1 and has no speculation settings
    plain_kw = {k: v for k, v in kw.items() if k != "block_size" and not k.startswith("spec_")}
    engines = {"plain": make_engine(EngineConfig(target=target, **plain_kw)),
               "dflash": make_engine(EngineConfig(target=target, drafter=drafter, **kw))}
    if metrics_port is not None:  # the DFlash engine's metrics, as the Serve app exports them
        from ..metrics.exporter import Exporter
        from ..metrics.prometheus import PrometheusBackend

        backend = PrometheusBackend()
        exporter = Exporter(backend, "bench")
        engines["dflash"].add_listener(exporter.on_step, exporter.on_outputs)
        exporter.watch(engines["dflash"])
        backend.serve(metrics_port)
        tqdm.write(f"metrics on http://127.0.0.1:{metrics_port}/metrics")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    warm = SamplingParams(max_tokens=min(16, max_tokens), temperature=0.0)
    runs: dict[int, dict[str, list]] = {c: {"plain": [], "dflash": []} for c in concurrency}
    total = 2 * len(prompts) * len(concurrency) * rounds
    with tqdm(total=total, desc="bench", unit="req") as bar:
        quiet = tqdm(disable=True)
        for c in concurrency:
            for e in engines.values():
                closed_loop(e, prompts[:c], c, warm, quiet)
        for k in range(rounds):
            order = ["plain", "dflash"] if k % 2 == 0 else ["dflash", "plain"]
            for c in concurrency:
                for name in order:
                    runs[c][name].append(closed_loop(engines[name], prompts, c, params, bar))
    rows = []
    for c in concurrency:
        pairs = list(zip(runs[c]["plain"], runs[c]["dflash"], strict=True))
        base, fast = summarize(runs[c]["plain"]), summarize(runs[c]["dflash"])
        same = all(sorted(p["outputs"]) == sorted(d["outputs"]) for p, d in pairs)
        per_round = [d["tok_s"] / p["tok_s"] for p, d in pairs]
        rows.append({"concurrency": c, "plain": base, "dflash": fast,
                     "speedup": fast["tok_s"] / base["tok_s"],
                     "speedup_per_round": per_round, "outputs_identical": same})
        tqdm.write(f"c={c:>2}: plain {base['tok_s']:7.1f} tok/s, dflash {fast['tok_s']:7.1f} "
                   f"tok/s, speedup {rows[-1]['speedup']:.2f}x (rounds "
                   f"{min(per_round):.2f}-{max(per_round):.2f}), tau {fast['mean_tau']:.2f} "
                   f"(with drafts {fast['acceptance_length']:.2f}), "
                   f"step {base['ms_per_step']:.2f} / {fast['ms_per_step']:.2f} ms, "
                   f"identical={same}")
    spec = engines["dflash"]
    result = {"target": _shown(target), "drafter": _shown(drafter), "block_size": spec.block_size,
              "spec_min_confidence": spec.config.spec_min_confidence,
              "spec_max_batch": spec.config.spec_max_batch,
              "spec_reject_cooldown": spec.config.spec_reject_cooldown,
              "max_tokens": max_tokens, "num_prompts": len(prompts), "rounds": rounds,
              "rows": rows}
    policy = spec.scheduler.policy.summary()
    if policy is not None:  # spec_max_batch: auto, what it measured
        result["spec_policy"] = policy
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
