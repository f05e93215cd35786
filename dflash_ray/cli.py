"""`dflash-ray` command line: generate, and the other commands as they land."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="target model directory (Hugging Face format)")
    p.add_argument("--drafter", default=None, help="DFlash drafter directory (z-lab format)")
    p.add_argument(
        "--demo", action="store_true", help="use the small trained pair that ships with the package"
    )
    p.add_argument("--block-size", type=int, default=None, help="verify block B")
    p.add_argument(
        "--spec-profile",
        choices=["device", "whole_block"],
        default=None,
        help="defaults of the --spec-* settings not given: the fastest measured for the device "
        "(default) or z-lab's whole block",
    )
    p.add_argument(
        "--spec-min-confidence",
        type=float,
        default=None,
        help="verify drafts while the drafter's probability of the prefix stays >= this",
    )
    p.add_argument(
        "--spec-max-batch",
        type=_int_or_auto,
        default=None,
        help="speculate only while at most this many sequences run; 'auto' learns it, "
        "'none' speculates at any batch size",
    )
    p.add_argument(
        "--spec-reject-cooldown",
        type=int,
        default=None,
        help="steps a sequence decodes plain after all its drafts were rejected",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--drafter-dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the drafter's dtype (auto: a 16-bit --dtype, else bfloat16 where the device "
        "has a native bf16 GEMM, else --dtype)",
    )
    p.add_argument(
        "--cuda-graphs",
        default=None,
        choices=["auto", "on", "eager", "off"],
        help="decode/verify/drafter passes from CUDA graphs padded to a bucket (auto: on for "
        "CUDA, else off; eager: the padded path without capture)",
    )


def _int_or_auto(text: str) -> int | str:
    if text in ("auto", "none"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer, 'auto' or 'none', got {text!r}"
        ) from None


def _models(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.demo:
        from .demo import demo_pair

        target, drafter = demo_pair()
        return args.target or target, args.drafter or drafter
    if not args.target:
        raise SystemExit("error: --target DIR is required (or --demo for the shipped pair)")
    return args.target, args.drafter


def _engine_kwargs(args: argparse.Namespace, drafter: str | None) -> dict:
    """EngineConfig fields given on the command line (unset ones keep the config's defaults)."""
    kw = {"device": args.device, "dtype": args.dtype, "block_size": args.block_size,
          "cuda_graphs": args.cuda_graphs}
    if drafter is not None:
        kw["spec_profile"] = args.spec_profile
        kw["spec_min_confidence"] = args.spec_min_confidence
        kw["spec_max_batch"] = args.spec_max_batch
        kw["spec_reject_cooldown"] = args.spec_reject_cooldown
        kw["drafter_dtype"] = args.drafter_dtype
    kw = {k: v for k, v in kw.items() if v is not None}
    if kw.get("spec_max_batch") == "none":
        kw["spec_max_batch"] = None  # given: no limit (unlike leaving it out)
    return kw


def _generate(args: argparse.Namespace) -> int:
    from . import LLM, SamplingParams

    target, drafter = _models(args)
    llm = LLM(target, drafter, **_engine_kwargs(args, drafter))
    prompt: str | list[int]
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise SystemExit("error: give --prompt TEXT or --prompt-ids 1,2,3")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    if args.json:
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "acceptance_lengths": out.acceptance_lengths,
                    "mean_acceptance_length": out.acceptance_length,
                    "num_draft_tokens": out.num_draft_tokens,
                    "num_accepted_tokens": out.num_accepted_tokens,
                    "seconds": round(seconds, 4),
                    "tokens_per_second": round(len(out.token_ids) / seconds, 2),
                }
            )
        )
    else:
        print(out.text if llm.tokenizer is not None else out.token_ids)
        tau = f", mean acceptance length {out.acceptance_length:.2f}" if drafter else ""
        print(
            f"[{len(out.token_ids)} tokens in {seconds:.2f}s{tau}, "
            f"finish_reason={out.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .benchmark.offline import load_prompts, run_bench

    target, drafter = _models(args)
    if drafter is None:
        raise SystemExit("error: bench compares plain decoding with DFlash: give --drafter")
    prompts = load_prompts(args.prompts, target, args.num_prompts)
    engine = _engine_kwargs(args, drafter)
    result = run_bench(target, drafter, prompts, args.concurrency, args.max_tokens, args.out,
                       engine, rounds=args.rounds, metrics_port=args.metrics_port)
    if args.json:
        print(json.dumps(result))
    return 0


def _dashboard_snapshot(args: argparse.Namespace) -> int:
    from .metrics.snapshot import snapshot

    drawn = snapshot(args.prometheus, args.out, args.minutes, args.prefix, args.model_name,
                     args.replica)
    with_data = sum(1 for n in drawn.values() if n)
    print(f"{args.out}/dashboard.png: {with_data} of {len(drawn)} panels with data")
    if args.json:
        print(json.dumps(drawn))
    return 0


def _train_drafter(argv: list[str]) -> int:
    from .train.train_drafter import main

    return main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(g)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_generate)
    b = sub.add_parser("bench", help="plain vs DFlash throughput, tau and speedup")
    _add_model_args(b)
    b.add_argument("--prompts", help="JSONL file with a 'prompt' field (default: held-out set)")
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--rounds", type=int, default=3,
                   help="times each engine runs each level; the first engine alternates between "
                   "rounds (default 3)")
    b.add_argument("--out", default="bench_results", help="directory for bench.json and PNGs")
    b.add_argument("--json", action="store_true", help="also print the result JSON")
    b.set_defaults(func=_bench)
    b.add_argument("--metrics-port", type=int, default=None,
                   help="export the DFlash engine's metrics on http://127.0.0.1:PORT/metrics "
                   "(prometheus_client; names in dflash_ray/metrics/catalog.py)")
    s = sub.add_parser("dashboard-snapshot", help="draw the Grafana dashboard's panels from a "
                       "live Prometheus into one PNG")
    s.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    s.add_argument("--out", default="dashboard_snapshot", help="directory for dashboard.png")
    s.add_argument("--minutes", type=float, default=15.0, help="how far back")
    s.add_argument("--prefix", default="ray_", help="metric prefix: ray_ for the Serve app, "
                   "'' for an offline engine's exporter")
    s.add_argument("--model-name", default=".*", help="model_name label (regex)")
    s.add_argument("--replica", default=".*", help="replica label (regex)")
    s.add_argument("--json", action="store_true", help="also print series per panel")
    s.set_defaults(func=_dashboard_snapshot)
    sub.add_parser("train-drafter", help="train a DFlash drafter for a target "
                   "(dflash-ray train-drafter --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-drafter"]:  # its own parser: many training options
        return _train_drafter(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
