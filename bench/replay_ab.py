"""Old vs new step cost on the same recorded batches, side by side in one process.

Runs the shipped pair (DFlash, greedy, c = `--concurrency`) once to record the inputs of every
target forward (plain decode steps, verify steps) and every drafter block pass, then times each
variant of the ops on those same inputs in interleaved rounds and reports medians per kind and
the ratio of each variant to the first:

    python3 bench/replay_ab.py                       # the references vs the fast paths
    python3 bench/replay_ab.py --variants ref,fast --rounds 7
    python3 bench/replay_ab.py --engine              # whole engines: tok/s, ref vs fast

A variant is a set of registry overrides (`dflash_ray.ops.override`): `ref` runs the
references of the ops that have a fast path (`ops/fast.py`), `fast` those fast paths. The
packed CPU weights stay as the engine loaded them in both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dflash_ray.benchmark.offline import closed_loop  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402
from dflash_ray.config import EngineConfig  # noqa: E402
from dflash_ray.core.sampling_params import SamplingParams  # noqa: E402
from dflash_ray.demo import demo_pair  # noqa: E402
from dflash_ray.executors import make_engine  # noqa: E402
from dflash_ray.ops import REFERENCE, override  # noqa: E402
from dflash_ray.ops.fast import FAST  # noqa: E402


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def record(engine, prompts, concurrency, params) -> dict[str, list]:
    """Inputs of the target's forwards and the drafter's block passes of one closed-loop run,
    by kind: 'decode' (one token a sequence), 'verify' (blocks), 'draft'."""
    ex = engine.executor
    calls: dict[str, list] = defaultdict(list)
    target, drafter = ex.target.model, ex.drafter.drafter

    def wrap(model, kind_of):
        fwd = model.forward

        def recorded(*args, **kw):
            kind = kind_of(args)
            if kind:
                calls[kind].append((model, tuple(_clone(a) for a in args),
                                    {k: _clone(v) for k, v in kw.items()}))
            return fwd(*args, **kw)

        model.forward = recorded
        return fwd

    def target_kind(args):
        groups = args[4]
        if any(g.query_rows.shape[1] > 16 for g in groups) or len(groups) != 1:
            return None  # a prefill
        return "decode" if groups[0].query_rows.shape[1] == 1 else "verify"

    fwds = (wrap(target, target_kind), wrap(drafter, lambda a: "draft"))
    try:
        closed_loop(engine, prompts, concurrency, params, tqdm(disable=True))
    finally:
        target.forward, drafter.forward = fwds
    return calls


VARIANTS: dict[str, dict] = {"ref": {name: REFERENCE[name] for name in FAST}, "fast": FAST}
for _op in FAST:  # one fast path at a time: "fast:moe_experts"
    VARIANTS[f"fast:{_op}"] = {**VARIANTS["ref"], _op: FAST[_op]}


def _variant(name: str):
    stack = contextlib.ExitStack()
    for op, impl in VARIANTS[name].items():
        stack.enter_context(override(op, impl))
    return stack


@torch.inference_mode()
def time_calls(calls, name: str) -> list[float]:
    """Seconds of each call under variant `name`."""
    out = []
    with _variant(name):
        for model, args, kw in calls:
            t = time.perf_counter()
            model(*args, **kw)
            out.append(time.perf_counter() - t)
    return out


def engine_ab(names: list[str], prompts: int, max_tokens: int, rounds: int) -> dict:
    """Whole closed-loop runs at c = 1, DFlash and plain, variants alternated in one engine:
    median tok/s per variant and whether every variant gave the same tokens."""
    target, drafter = demo_pair()
    ps = bench_prompts(target, prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    out = {}
    for label, extra in (("dflash", {"drafter": drafter}), ("plain", {})):
        engine = make_engine(EngineConfig(target=target, max_num_seqs=1, **extra))
        rates: dict[str, list[float]] = defaultdict(list)
        tokens = {}
        try:
            closed_loop(engine, ps[:1], 1, params, tqdm(disable=True))
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    with _variant(name):
                        run = closed_loop(engine, ps, 1, params, tqdm(disable=True))
                    rates[name].append(run["tokens"] / run["seconds"])
                    tokens[name] = run["outputs"]
        finally:
            engine.shutdown()
        med = {n: statistics.median(rates[n]) for n in names}
        out[label] = {"tok_s": med, "ratio": {n: med[n] / med[names[0]] for n in names},
                      "same_tokens": all(tokens[n] == tokens[names[0]] for n in names)}
        rows = ", ".join(f"{n} {med[n]:.1f} tok/s ({med[n] / med[names[0]]:.3f}x)" for n in names)
        print(f"{label}: {rows}; same tokens {out[label]['same_tokens']}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variants", default="ref,fast", help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--engine", action="store_true", help="whole engines instead of replays")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    out = engine_ab(names, args.prompts, args.max_tokens, args.rounds) if args.engine \
        else replay_ab(names, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


def replay_ab(names: list[str], args) -> dict:
    """Recorded steps replayed under each variant (see the module docstring)."""
    target, drafter = demo_pair()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    engine = make_engine(EngineConfig(target=target, drafter=drafter,
                                      max_num_seqs=args.concurrency))
    try:
        calls = record(engine, bench_prompts(target, args.prompts), args.concurrency, params)
        # the recorded plain-decode calls: the same engine with no drafter decodes plain
        plain = make_engine(EngineConfig(target=target, max_num_seqs=args.concurrency))
        try:
            ex = plain.executor
            fwd, got = ex.target.model.forward, []
            ex.target.model.forward = lambda *a, **k: (got.append(
                (ex.target.model, tuple(_clone(x) for x in a), {kk: _clone(v) for kk, v in
                                                                 k.items()})), fwd(*a, **k))[1]
            closed_loop(plain, bench_prompts(target, args.prompts)[:2], args.concurrency,
                        params, tqdm(disable=True))
            ex.target.model.forward = fwd
            calls["decode"] = [c for c in got if c[1][4][0].query_rows.shape[1] == 1
                               and len(c[1][4]) == 1]
            for name in names:  # warm-up (and compilation, where a variant compiles)
                for kind in calls:
                    time_calls(calls[kind][:8], name)
            # per kind and variant, each call's seconds in every round
            per: dict[str, dict[str, list[list[float]]]] = {k: defaultdict(list) for k in calls}
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for kind, cs in calls.items():
                    for name in order:
                        per[kind][name].append(time_calls(cs, name))
        finally:
            plain.shutdown()
    finally:
        engine.shutdown()
    out = {"rounds": args.rounds, "calls": {k: len(v) for k, v in calls.items()}, "ms": {},
           "ratio": {}}
    for kind in per:
        # a call's median over the rounds (the shared box's noise hits single rounds), averaged
        # over the calls
        med = {n: 1000 * statistics.fmean(statistics.median(c)
                                          for c in zip(*per[kind][n], strict=True))
               for n in names}
        out["ms"][kind] = med
        out["ratio"][kind] = {n: med[n] / med[names[0]] for n in names}
        print(f"{kind:6s} ({len(calls[kind])} calls): " + ", ".join(
            f"{n} {med[n]:.3f} ms ({out['ratio'][kind][n]:.2f}x)" for n in names))
    return out


if __name__ == "__main__":
    main()
