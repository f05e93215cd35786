"""Every ratio issue 16 sets a target for, measured side by side in one run, each against its
target: DIR/ratios.json (value, target, met, both sides' tok/s, prompts, tokens, the command
behind it) and DIR/ratios.png (one bar per ratio, its target as a line).

1. `zlab`: our engine, default settings, DFlash vs z-lab's reference loop (`dflash_generate`, a
   transformers target) at concurrency 1, the same prompts and tokens (target >= 1.5).
2. `bench`: DFlash vs plain decoding on the bench prompts at concurrency 1, 4, 8, 16, 32
   (`dflash-ray bench`'s interleaved rounds; >= 2 at 1, >= 0.98 at each); `code`: the same at
   concurrency 1 on function headers + docstrings of third-party packages (>= 1.5).
3. `hf`: plain decoding vs transformers' `generate`, batch 1 (>= 1.5).
4. `serve`: HTTP streaming through Ray Serve vs in-process at concurrency 8 (>= 0.90), `--rounds`
   rounds, each in-process then through Serve.
5. `ray`: the Ray executor (drafter actor + 1 target shard) vs in-process at 8 (>= 0.85).
6. `bound`: DFlash's speedup at concurrency 1 over the bound `step_costs.py` computes for a
   free drafter and a verify at a plain step's cost (no target: how far from it).

Serve and Ray run in a spawned process of their own with a fresh local Ray (never an existing
cluster), started and shut down there; the rest runs here, one torch thread.

    python3 bench/ratios.py --out docs/bench/ratios [--quick] [--parts zlab hf ...]
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dflash_ray import LLM, SamplingParams, demo_pair  # noqa: E402
from dflash_ray.benchmark.code_prompts import PACKAGES, thirdparty_prompts  # noqa: E402
from dflash_ray.benchmark.offline import _shown, closed_loop, run_bench, summarize  # noqa: E402
from dflash_ray.benchmark.prompts import bench_prompts  # noqa: E402

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the sibling scripts import as modules, here and in children
    sys.path.insert(0, str(BENCH))

import engine_vs_hf  # noqa: E402
import ray_executor  # noqa: E402
import serve_vs_engine  # noqa: E402
import step_costs  # noqa: E402

PARTS = ("zlab", "bench", "code", "hf", "serve", "ray", "bound")
# sizes: prompts x tokens for parts 1-3 and 6, the bench sweep's prompts, Serve / Ray requests
FULL = dict(prompts=8, max_tokens=128, rounds=3, sweep_prompts=32, requests=32,
            request_tokens=64)
QUICK = dict(prompts=2, max_tokens=32, rounds=1, sweep_prompts=8, requests=8, request_tokens=32)


def ratio(name: str, value: float, target: float | None, num: tuple[str, float],
          den: tuple[str, float], command: list[str], unit: str = "tok/s", **inputs) -> dict:
    """One row of ratios.json: the ratio of num (label, figure in `unit`) to den, against its
    target."""
    return {"name": name, "value": value, "target": target,
            "met": None if target is None else bool(value >= target),
            "inputs": {"numerator": num[0], "numerator_value": num[1], "denominator": den[0],
                       "denominator_value": den[1], "unit": unit, **inputs},
            "command": command}


def ours_vs(name: str, engine, other, prompts: list, max_tokens: int, rounds: int) -> dict:
    """Our engine (closed loop, concurrency 1) against `other(prompts, max_tokens)` -> (seconds,
    outputs), on the same prompts and exactly `max_tokens` tokens each (no EOS stop); one
    untimed short pass of each first, then `rounds` rounds, the side going first alternating.
    Shuts the engine down."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=min(16, max_tokens), temperature=0.0, ignore_eos=True)
    closed_loop(engine, prompts[:1], 1, warm, tqdm(disable=True))
    other(prompts[:1], warm.max_tokens)
    ours, theirs = [], {"seconds": 0.0, "tokens": 0}
    per_round = []  # (ours, theirs) tok/s of each round
    identical, mismatched = True, set()
    with engine_closed(engine), tqdm(total=2 * rounds * len(prompts), desc=name,
                                     unit="req") as bar:
        for k in range(rounds):
            for side in ("ours", "theirs")[:: 1 if k % 2 == 0 else -1]:
                if side == "ours":
                    run = closed_loop(engine, prompts, 1, params, bar)
                    ours.append(run)
                    ours_out = run.pop("outputs")  # concurrency 1: in prompt order
                    continue
                seconds, outs = other(prompts, max_tokens)
                theirs["seconds"] += seconds
                theirs["tokens"] += sum(map(len, outs))
                theirs_tok_s = sum(map(len, outs)) / seconds
                bar.update(len(prompts))
            per_round.append((ours[-1]["tok_s"], theirs_tok_s))
            bad = {i for i, (a, b) in enumerate(zip(ours_out, outs, strict=True)) if a != b}
            mismatched |= bad
            identical &= not bad
    fast = summarize(ours)
    return {"ours_tok_s": fast["tok_s"], "theirs_tok_s": theirs["tokens"] / theirs["seconds"],
            "ours_tokens": fast["tokens"], "theirs_tokens": theirs["tokens"],
            "ours_acceptance_length": fast["acceptance_length"],
            "ratio_per_round": [a / b for a, b in per_round],
            "outputs_identical": identical, "mismatched_prompts": sorted(mismatched)}


@contextlib.contextmanager
def engine_closed(engine):
    try:
        yield engine
    finally:
        engine.shutdown()


def zlab_part(a, hf_target, prompts, command) -> list[dict]:
    import dflash.model as zlab

    if not torch.cuda.is_available():
        zlab._cuda_time = time.perf_counter  # z-lab's clock syncs CUDA
    drafter = zlab.DFlashDraftModel.from_pretrained(a.drafter, dtype=torch.float32).eval()
    taus: list[int] = []

    def reference(ps, max_tokens):
        seconds, outs = 0.0, []
        for p in ps:
            start = time.perf_counter()
            out = zlab.dflash_generate(drafter, hf_target, torch.tensor([p]), max_tokens, None,
                                       return_stats=True)
            seconds += time.perf_counter() - start
            outs.append(out.output_ids[0, len(p):].tolist())
            taus.extend(out.acceptance_lengths)
        return seconds, outs

    r = ours_vs("vs z-lab", LLM(a.target, a.drafter).engine, reference, prompts,
                a.max_tokens, a.rounds)
    return [ratio("engine_vs_zlab_c1", r["ours_tok_s"] / r["theirs_tok_s"], 1.5,
                  ("our engine, DFlash, default settings", r["ours_tok_s"]),
                  ("z-lab dflash_generate (transformers target, fp32 drafter)",
                   r["theirs_tok_s"]), command, concurrency=1, prompts=len(prompts),
                  prompt_set="bench_prompts", max_tokens=a.max_tokens, rounds=a.rounds,
                  tokens=[r["ours_tokens"], r["theirs_tokens"]],
                  # ours per verify step with drafts; z-lab's per step (each one verifies)
                  acceptance_length={"ours": r["ours_acceptance_length"],
                                     "zlab": sum(taus) / max(1, len(taus))},
                  ratio_per_round=r["ratio_per_round"], outputs_identical=r["outputs_identical"],
                  mismatched_prompts=r["mismatched_prompts"])]


def hf_part(a, hf_target, prompts, command) -> list[dict]:
    r = ours_vs("vs transformers", LLM(a.target).engine,
                lambda ps, n: engine_vs_hf.hf_generate(hf_target, ps, n), prompts,
                a.max_tokens, a.rounds)
    return [ratio("plain_vs_hf_generate_b1", r["ours_tok_s"] / r["theirs_tok_s"], 1.5,
                  ("our engine, plain decoding", r["ours_tok_s"]),
                  ("transformers generate, greedy", r["theirs_tok_s"]), command, batch=1,
                  prompts=len(prompts), prompt_set="bench_prompts", max_tokens=a.max_tokens,
                  rounds=a.rounds, tokens=[r["ours_tokens"], r["theirs_tokens"]],
                  ratio_per_round=r["ratio_per_round"], outputs_identical=r["outputs_identical"],
                  mismatched_prompts=r["mismatched_prompts"])]


def bench_rows(a, prompts, concurrency) -> list[dict]:
    result = run_bench(a.target, a.drafter, prompts, concurrency, a.max_tokens, None,
                       rounds=a.rounds)
    return result["rows"]


def spec_ratio(name: str, row: dict, target: float, command, **inputs) -> dict:
    return ratio(name, row["speedup"], target, ("DFlash, default settings",
                                               row["dflash"]["tok_s"]),
                 ("plain decoding", row["plain"]["tok_s"]), command,
                 concurrency=row["concurrency"], tokens=row["dflash"]["tokens"],
                 speedup_per_round=row["speedup_per_round"],
                 tokens_per_step=row["dflash"]["mean_tau"],
                 ms_per_step={k: row[k]["ms_per_step"] for k in ("dflash", "plain")},
                 draft_ms_per_step=row["dflash"]["draft_ms_per_step"],
                 acceptance_length=row["dflash"]["acceptance_length"],
                 outputs_identical=row["outputs_identical"], **inputs)


def bench_part(a, command) -> list[dict]:
    prompts = bench_prompts(a.target, a.sweep_prompts)
    rows = bench_rows(a, prompts, a.concurrency)
    sizes = dict(prompts=len(prompts), prompt_set="bench_prompts", max_tokens=a.max_tokens,
                 rounds=a.rounds)
    out = [spec_ratio("dflash_vs_plain_bench_c1", rows[0], 2.0, command, **sizes)] \
        if rows[0]["concurrency"] == 1 else []
    return out + [spec_ratio(f"dflash_vs_plain_c{r['concurrency']}", r, 0.98, command, **sizes)
                  for r in rows]


def code_part(a, command) -> list[dict]:
    prompts = thirdparty_prompts(a.target, a.prompts)
    row = bench_rows(a, prompts, [1])[0]
    return [spec_ratio("dflash_vs_plain_thirdparty_c1", row, 1.5, command, prompts=len(prompts),
                       prompt_set=f"thirdparty_prompts: headers + docstrings of {list(PACKAGES)}",
                       max_tokens=a.max_tokens, rounds=a.rounds)]


def bound_part(a, argv: list[str]) -> list[dict]:
    r = step_costs.main(argv)
    bound = r["bound_free_drafter_flat_verify"]
    return [ratio("speedup_over_bound_c1", r["speedup"] / bound, None,
                  ("measured DFlash speedup over plain", r["speedup"]),
                  ("bound: free drafter, verify at a plain step's cost (= tau)", bound),
                  ["python3", "bench/step_costs.py", *argv], unit="speedup", concurrency=1,
                  tok_s=r["tok_s"],
                  prompts=r["prompts"], max_tokens=a.max_tokens, rounds=r["rounds"],
                  tau=r["tau"], bound_free_drafter=r["bound_free_drafter"],
                  plain_ms=r["plain"]["verify_ms"], verify_ms=r["dflash"]["verify_ms"],
                  draft_ms=r["dflash"]["draft_ms"])]


@contextlib.contextmanager
def _local_ray():
    """Children spawned inside start a local Ray of their own (RAY_ADDRESS=local)."""
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_ADDRESS"]
        else:
            os.environ["RAY_ADDRESS"] = before


def in_child(fn, args):
    """`fn(args)` in a fresh spawned process; its Ray starts and stops there."""
    with _local_ray(), ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, args).result()


def serve_part(a, argv: list[str]) -> list[dict]:
    """`a.rounds` rounds at c = 8, each in-process then through Serve: one round moved 0.79-0.97
    within a run (docs/benchmarks.md), so the ratio is of the rounds' summed tok/s."""
    rows = in_child(serve_vs_engine.run, serve_vs_engine.parser().parse_args(argv))["rows"]
    serve, local = (sum(r[side]["tok_s"] for r in rows) / len(rows)
                    for side in ("serve", "in_process"))
    return [ratio("serve_vs_in_process_c8", serve / local, 0.90,
                  ("HTTP streaming through Serve", serve),
                  ("the same engine in-process, streamed", local),
                  ["python3", "bench/serve_vs_engine.py", *argv], concurrency=8,
                  prompts=a.requests, prompt_set="bench_prompts", max_tokens=a.request_tokens,
                  tokens=[a.requests * a.request_tokens * len(rows)] * 2, rounds=len(rows),
                  round_ratios=[r["ratio"] for r in rows], stream_interval="default (1)",
                  serve=[r["serve"] for r in rows], in_process=[r["in_process"] for r in rows])]


def cpu() -> dict:
    """The machine measured: these runs land on x86-64 hosts that differ from run to run (with
    and without AVX-512 BF16 / AMX), which moves the ratios more than most changes."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(),
            "bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx"))}


def ray_part(a, argv: list[str]) -> list[dict]:
    result = in_child(ray_executor.run, ray_executor.parser().parse_args(argv))
    local, remote = (next(r for r in result["rows"] if r["setup"].startswith(s))
                     for s in ("in-process", "ray 1 shard"))  # the default step_calls
    return [ratio("ray_executor_vs_in_process_c8", remote["vs_in_process"], 0.85,
                  ("Ray executor: drafter actor + 1 target shard", remote["tok_s"]),
                  ("in-process executor", local["tok_s"]),
                  ["python3", "bench/ray_executor.py", *argv], concurrency=8,
                  prompts=a.requests, prompt_set="bench_prompts", max_tokens=a.request_tokens,
                  tokens=[remote["tokens"], local["tokens"]],
                  outputs_identical=remote["outputs_identical"],
                  ms_per_step=[remote["ms_per_step"], local["ms_per_step"]])]


def run_parts(a, argv: list[str]) -> list[dict]:
    """Each part's ratios; a part that fails is recorded with its error, the rest still run."""
    pair = ["--target", a.target, "--drafter", a.drafter]
    sizes = ["--prompts", str(a.prompts), "--max-tokens", str(a.max_tokens)]

    def own(part: str) -> list[str]:  # this script, running that part alone
        return ["python3", "bench/ratios.py", "--out", a.out, "--parts", part, *pair, *sizes,
                "--rounds", str(a.rounds)]

    load = ["--requests", str(a.requests), "--max-tokens", str(a.request_tokens)]
    requests = ["--concurrency", "8", *load]
    bench_cmd = ["dflash-ray", "bench", *pair, "--concurrency", *map(str, a.concurrency),
                 "--max-tokens", str(a.max_tokens), "--rounds", str(a.rounds)]
    hf_target = None
    if {"zlab", "hf"} & set(a.parts):
        from transformers import AutoModelForCausalLM

        hf_target = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32).eval()
    prompts = bench_prompts(a.target, a.prompts)
    jobs = {
        "zlab": lambda: zlab_part(a, hf_target, prompts, own("zlab")),
        "bench": lambda: bench_part(a, [*bench_cmd, "--num-prompts", str(a.sweep_prompts)]),
        "code": lambda: code_part(a, own("code")),
        "hf": lambda: hf_part(a, hf_target, prompts, own("hf")),
        "serve": lambda: serve_part(a, [*pair, "--concurrency", *["8"] * a.rounds, *load]),
        "ray": lambda: ray_part(a, [*pair, *requests, "--shards", "1", "--rounds", str(a.rounds)]),
        "bound": lambda: bound_part(a, [*pair, *sizes, "--rounds", str(a.rounds)]),
    }
    out = []
    for part in (bar := tqdm(a.parts, desc="ratios", unit="part")):
        bar.set_postfix_str(part)
        try:
            out += jobs[part]()
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
            tqdm.write(f"part {part} failed: {e!r}")
            out.append({"name": part, "value": None, "target": None, "met": False,
                        "error": repr(e), "inputs": {}, "command": own(part)})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 4.5))
    for x, r in enumerate(rows):
        color = "gray" if r["met"] is None else ("tab:green" if r["met"] else "tab:red")
        ax.bar(x, r["value"] or 0, color=color)
        if r["target"] is not None:
            ax.hlines(r["target"], x - 0.45, x + 0.45, color="black", lw=2)
        if r["value"] is not None:
            ax.annotate(f"{r['value']:.2f}", (x, r["value"]), ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=40, ha="right",
                  fontsize=8)
    ax.set(ylabel="ratio", title="ratios against their targets (lines): green met, red missed, "
           "gray no target")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = [f"{'ratio':<32} {'value':>6} {'target':>6} {'met':>5}  numerator / denominator"]
    for r in rows:
        i = r["inputs"]
        value = "error" if r["value"] is None else f"{r['value']:.2f}"
        target = "-" if r["target"] is None else f"{r['target']:.2f}"
        sides = (f"{i['numerator_value']:.1f} / {i['denominator_value']:.1f} {i['unit']}"
                 if i else r.get("error", ""))
        same = i.get("outputs_identical")
        lines.append(f"{r['name']:<32} {value:>6} {target:>6} {str(r['met']):>5}  {sides}"
                     + ("" if same is None else f"  identical={same}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for ratios.json and ratios.png")
    p.add_argument("--quick", action="store_true", help="few prompts and tokens, one round")
    p.add_argument("--target")
    p.add_argument("--drafter")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32],
                   help="the bench sweep's levels")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if bool(a.target) != bool(a.drafter):
        p.error("--target and --drafter go together")
    if not a.target:
        a.target, a.drafter = demo_pair()
    # relative under the working directory: no machine's absolute paths in the saved commands
    a.target, a.drafter = _shown(a.target), _shown(a.drafter)
    torch.set_num_threads(1)

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=BENCH).stdout

    # the code measured: the commit, and the tracked files that differed from it, at the start
    commit = git("rev-parse", "--short", "HEAD").strip()
    uncommitted = [line[3:] for line in git("status", "--porcelain",
                                            "--untracked-files=no").splitlines()]
    start = time.time()
    rows = run_parts(a, argv)
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "uncommitted": uncommitted,
              "cpu": cpu(), "command": " ".join(["python3", "bench/ratios.py", *argv]),
              "quick": a.quick,
              "target": a.target, "drafter": a.drafter,
              "sizes": {k: getattr(a, k) for k in FULL}, "concurrency": a.concurrency,
              "minutes": (time.time() - start) / 60, "ratios": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ratios.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "ratios.png")
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
