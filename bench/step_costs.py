"""Where a speculative step's time goes, against a plain one: the numbers behind the speedup,
and the bounds they put on it.

Runs plain decoding and DFlash on the same engine code (one process, the same prompts, rounds
alternated, greedy) at one concurrency and reports, per decode step:

- plain: ms, and how many MoE experts each layer runs;
- DFlash: the drafter pass, and the target's verify by the number of tokens it verifies (ms,
  experts per layer), tokens committed per step;
- the measured speedup, and two bounds from the same numbers: a free drafter
  (tau x plain / verify) and a verify that also costs what one plain step does (tau), which is
  roughly where a memory-bound GPU step of a dense target sits.

    python3 bench/step_costs.py                            # demo pair, demo config, c = 1
    python3 bench/step_costs.py --spec-min-confidence 0    # whole blocks
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.engine import Engine  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402
from dflash_ray.ops import OPS, override  # noqa: E402


class StepRecorder:
    """Times an engine's target verify calls (decode-only steps, keyed by tokens verified), its
    drafter passes, and the experts each MoE layer runs inside those verify calls."""

    active: StepRecorder | None = None  # whose verify is running (route_experts reports there)

    def __init__(self, engine: Engine):
        self.verify: dict[int, list[float]] = defaultdict(list)
        self.experts: dict[int, list[int]] = defaultdict(list)
        self.draft: list[float] = []
        self.committed = 0  # tokens committed by the timed steps' sequences
        self.seq_steps = 0  # sequences x timed steps
        self.on = False
        executor = engine.executor
        self._wrap_verify(executor.target)
        if executor.drafter is not None:
            self._wrap_draft(executor.drafter)

    def _wrap_verify(self, worker) -> None:
        verify = worker.verify

        def timed(batch, drafts, drafter_lost=False):
            if not self.on or batch.prefills:
                return verify(batch, drafts, drafter_lost)
            hits: list[int] = []
            StepRecorder.active, self._hits = self, hits
            t = time.perf_counter()
            try:
                out = verify(batch, drafts, drafter_lost)
                self.committed += sum(len(r.tokens) for r in out)
                self.seq_steps += len(batch.decodes)
                return out
            finally:
                seconds = time.perf_counter() - t
                StepRecorder.active = None
                # the blocks verified: bonus + proposed drafts
                tokens = len(batch.decodes) + (sum(drafts.num_proposed) if drafts else 0)
                self.verify[tokens].append(seconds)
                self.experts[tokens] += hits

        worker.verify = timed

    def _wrap_draft(self, worker) -> None:
        draft = worker.draft

        def timed(batch, features):
            t = time.perf_counter()
            out = draft(batch, features)
            if self.on and any(d.num_queries > 1 for d in batch.decodes):
                self.draft.append(time.perf_counter() - t)
            return out

        worker.draft = timed

    def summary(self) -> dict:
        rows = {}
        for tokens in sorted(self.verify):
            times, hits = self.verify[tokens], self.experts[tokens]
            rows[tokens] = {"steps": len(times), "ms": 1000 * sum(times) / len(times),
                            "experts_per_layer": sum(hits) / max(1, len(hits))}
        steps = sum(r["steps"] for r in rows.values())
        return {
            "verify_by_tokens": rows,
            "verify_ms": sum(r["ms"] * r["steps"] for r in rows.values()) / max(1, steps),
            "experts_per_layer": sum(sum(h) for h in self.experts.values())
            / max(1, sum(len(h) for h in self.experts.values())),
            "draft_ms": 1000 * sum(self.draft) / len(self.draft) if self.draft else 0.0,
            # tokens a sequence commits per decode step
            "tau": self.committed / max(1, self.seq_steps),
        }


def _count_experts():
    """Every MoE layer reports how many distinct experts its tokens hit (inside the block)."""
    route = OPS.route_experts

    def counted(router_logits, top_k, normalize):
        weights, ids = route(router_logits, top_k, normalize)
        if StepRecorder.active is not None:
            StepRecorder.active._hits.append(int(ids.unique().numel()))
        return weights, ids

    return override("route_experts", counted)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target")
    p.add_argument("--drafter")
    p.add_argument("--spec-min-confidence", type=float, default=0.1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    if args.target and args.drafter:
        target, drafter = args.target, args.drafter
    else:
        target, drafter = demo_pair()
        target, drafter = args.target or target, args.drafter or drafter
    prompts = bench_prompts(target, args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    common = dict(target=target, max_num_seqs=args.concurrency)
    engines = {
        "plain": make_engine(EngineConfig(**common)),
        "dflash": make_engine(EngineConfig(**common, drafter=drafter,
                                      spec_min_confidence=args.spec_min_confidence)),
    }
    recorders = {name: StepRecorder(e) for name, e in engines.items()}
    try:
        with _count_experts():
            for e in engines.values():  # warm-up, not recorded
                closed_loop(e, prompts[:1], args.concurrency, params, tqdm(disable=True))
            runs: dict[str, list[dict]] = {name: [] for name in engines}
            with tqdm(total=args.rounds * len(engines) * len(prompts), desc="step costs") as bar:
                for r in range(args.rounds):
                    for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                        recorders[name].on = True
                        runs[name].append(closed_loop(engines[name], prompts, args.concurrency,
                                                      params, bar))
                        recorders[name].on = False
    finally:
        for e in engines.values():
            e.shutdown()

    def rate(name: str) -> float:
        return sum(r["tokens"] for r in runs[name]) / sum(r["seconds"] for r in runs[name])

    plain, spec = recorders["plain"].summary(), recorders["dflash"].summary()
    plain_ms, tau = plain["verify_ms"], spec["tau"]
    out = {
        "concurrency": args.concurrency,
        "spec_min_confidence": args.spec_min_confidence,
        "prompts": len(prompts),
        "rounds": args.rounds,
        "plain": plain,
        "dflash": spec,
        "tau": tau,
        "tok_s": {"plain": rate("plain"), "dflash": rate("dflash")},
        "speedup": rate("dflash") / rate("plain"),
        # the same tokens per step, costs changed: no drafter, then verify at a plain step's cost
        # (per step of the same batch: a plain step commits 1 token a sequence, this one tau)
        "bound_free_drafter": tau * plain_ms / spec["verify_ms"],
        "bound_free_drafter_flat_verify": tau,
    }
    print(f"plain: {plain_ms:.2f} ms a step, {plain['experts_per_layer']:.2f} experts per layer")
    print(f"dflash: drafter pass {spec['draft_ms']:.2f} ms, verify {spec['verify_ms']:.2f} ms, "
          f"{spec['experts_per_layer']:.2f} experts per layer, tau {tau:.2f}")
    print("  tokens verified: steps, ms, experts per layer")
    for tokens, row in spec["verify_by_tokens"].items():
        print(f"  {tokens:3d}: {row['steps']:5d} {row['ms']:6.2f} {row['experts_per_layer']:5.2f}")
    print(f"speedup {out['speedup']:.2f}x; bounds at this tau: free drafter "
          f"{out['bound_free_drafter']:.2f}x, free drafter and flat verify {tau:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
