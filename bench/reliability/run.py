"""A reliability suite to run against a dflash-ray server on this machine: load, a disconnect
storm, a soak with the RSS trend, hostile inputs beside a victim request, schemathesis fuzzing,
and (opt-in) kills of the drafter, a target shard and the model-server replica under load.

    python3 bench/reliability/run.py --url http://127.0.0.1:8000 [--quick]
        [--only load,storm,soak,hostile,fuzz] [--out F.json] [--pids 123,456]
    python3 bench/reliability/run.py --serve deployments/dflash-ray-executor.yaml --allow-kills

`--serve YAML` starts `serve run YAML` (a Ray cluster of its own) and stops it at the end;
`--pids` names the server's processes (RSS for the soak; where the kills look for actors).
Every section prints a progress line and its figures, and all of them go to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import Server, descendants, title  # noqa: E402
from fuzz import fuzz  # noqa: E402
from hostile import hostile  # noqa: E402
from kills import kills  # noqa: E402
from traffic import load, soak, storm  # noqa: E402

from dflash_ray.server import serve_env  # noqa: E402

SECTIONS = ["load", "storm", "soak", "hostile", "fuzz", "kills"]
SERVER_TITLES = ("ServeReplica:", "ray::DrafterActor", "ray::TargetShardActor")


class UsageError(ValueError):
    """A bad flag; the message names it."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="the server, http://127.0.0.1:PORT (default with --serve: "
                   "the YAML's port)")
    p.add_argument("--serve", help="start `serve run` on this deployment YAML, stop it after")
    p.add_argument("--api-key", default=os.environ.get("DFLASH_API_KEY"),
                   help="the server's key (default $DFLASH_API_KEY)")
    p.add_argument("--quick", action="store_true", help="small variants (CI: a minute or two)")
    p.add_argument("--only", default=None, help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--out", default=None, help="write every section's figures to this JSON")
    p.add_argument("--pids", default=None, help="comma-separated pids of the server processes")
    p.add_argument("--allow-kills", action="store_true",
                   help="run the kills section (needs --serve or --pids)")
    p.add_argument("--streams", type=int, default=None, help="load: concurrent streams (200)")
    p.add_argument("--storm", type=int, default=None, help="storm: abandoned streams (100)")
    p.add_argument("--soak-minutes", type=float, default=None, help="soak: minutes (3)")
    p.add_argument("--soak-concurrency", type=int, default=16)
    p.add_argument("--fuzz-cases", type=int, default=None, help="fuzz: cases (1000)")
    args = p.parse_args(argv)
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    if args.url is None and args.serve is None:
        raise UsageError("--url is required (or --serve YAML to start a server)")
    if args.url is not None:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise UsageError(f"--url {args.url!r}: the suite runs against http://127.0.0.1:PORT "
                             "only (it sends abuse and, with --allow-kills, kills processes)")
    if args.serve is not None and not Path(args.serve).is_file():
        raise UsageError(f"--serve {args.serve!r}: no such file")
    wanted = SECTIONS if args.only is None else [s.strip() for s in args.only.split(",") if s]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad or not wanted:
        raise UsageError(f"--only {args.only!r}: unknown section(s) {bad}; choose from "
                         f"{','.join(SECTIONS)}")
    if args.only is not None and "kills" in wanted and not args.allow_kills:
        raise UsageError("--only kills needs --allow-kills")
    if not args.allow_kills and "kills" in wanted:
        wanted.remove("kills")
    if args.allow_kills and args.serve is None and args.pids is None:
        raise UsageError("--allow-kills needs --serve YAML or --pids (which processes to kill)")
    try:
        args.pids = [int(p) for p in args.pids.split(",")] if args.pids else []
    except ValueError:
        raise UsageError(f"--pids {args.pids!r}: comma-separated integers") from None
    for name in ("streams", "storm", "soak_minutes", "fuzz_cases"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be > 0")
    if args.soak_concurrency <= 0:
        raise UsageError(f"--soak-concurrency {args.soak_concurrency}: must be > 0")
    args.sections = wanted


def sizes(args: argparse.Namespace) -> dict:
    q = args.quick
    return {"streams": args.streams or (16 if q else 200),
            "storm": args.storm or (16 if q else 100),
            "soak_minutes": args.soak_minutes or (0.25 if q else 3.0),
            "fuzz_cases": args.fuzz_cases or (50 if q else 1000)}


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"{url}/health not 200 within {timeout_s:g} s")


@contextlib.contextmanager
def serve_run(yaml_path: str, log_path: str):
    """`serve run` in a session of its own (its own Ray cluster: RAY_ADDRESS=local); SIGTERM
    to it at the end (a backgrounded serve run ignores SIGINT), then SIGKILL to its group."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", RAY_ADDRESS="local")
    serve_env.apply(env)  # the cluster (its proxy included) as serve_env says to start it
    serve = Path(sys.executable).with_name("serve")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(serve) if serve.exists() else "serve", "run", yaml_path],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to `serve run` (it shuts its cluster down); what is left after `grace_s` is
    SIGKILLed by its process group (the session it was started in)."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def server_pids(roots: list[int]) -> list[int]:
    """The replicas' and actors' pids among the processes under `roots` (for the RSS trend)."""
    found = [p for r in roots for p in descendants(r)]
    return [p for p in found if any(t in title(p) for t in SERVER_TITLES)]


def run_sections(server: Server, args: argparse.Namespace, roots: list[int]) -> dict:
    n = sizes(args)
    results = {"url": server.url, "quick": args.quick, "sizes": n,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sections": {}}
    jobs = {
        "load": lambda: asyncio.run(load(server, n["streams"])),
        "storm": lambda: asyncio.run(storm(server, n["storm"])),
        "soak": lambda: asyncio.run(soak(server, n["soak_minutes"], args.soak_concurrency,
                                         sample_s=5 if args.quick else 10)),
        "hostile": lambda: asyncio.run(hostile(server, args.quick)),
        "fuzz": lambda: fuzz(server, n["fuzz_cases"]),
        "kills": lambda: asyncio.run(kills(server, roots)),
    }
    for name in args.sections:
        print(f"[{name}] running ...", flush=True)
        start = time.perf_counter()
        figures = jobs[name]()
        figures["section_s"] = round(time.perf_counter() - start, 1)
        results["sections"][name] = figures
        shown = {k: v for k, v in figures.items() if k not in ("samples", "cases")}
        print(f"[{name}] {json.dumps(shown, default=str)[:1500]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def model_name(server: Server) -> str:
    r = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> dict:
    try:
        args = parse(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    with contextlib.ExitStack() as stack:
        roots = list(args.pids)
        if args.serve:
            import yaml

            port = yaml.safe_load(Path(args.serve).read_text()).get("http_options", {}).get(
                "port", 8000)
            args.url = args.url or f"http://127.0.0.1:{port}"
            log = (args.out or "reliability") + ".serve.log"
            print(f"[serve] serve run {args.serve} (log: {log})", flush=True)
            proc = stack.enter_context(serve_run(args.serve, log))
            wait_ready(args.url, 300, proc)
            roots.append(proc.pid)
        else:
            wait_ready(args.url, 30)
        pids = list(args.pids) if args.pids else server_pids(roots)
        server = Server(args.url.rstrip("/"), args.api_key, pids=pids)
        server.model = model_name(server)
        return run_sections(server, args, roots)


if __name__ == "__main__":
    main()
