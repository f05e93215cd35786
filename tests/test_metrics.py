"""Metrics through the real app: the Serve replica's metrics exported by Ray's metrics agent add
up to what the responses' usage said; a real Prometheus scrapes them and evaluates every query of
the Grafana dashboard; the snapshot command draws the dashboard from it. Plus the offline
exporter (prometheus_client) and the dashboard file's generator."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dflash_ray import LLM, SamplingParams
from dflash_ray.metrics.catalog import METRICS
from dflash_ray.metrics.dashboard import PANELS, render
from dflash_ray.metrics.snapshot import fill

from .test_engine import add_char_tokenizer
from .test_server import free_port, wait_healthy

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
# What the served test app (local executor, roomy cache, a drafter that stays up) cannot
# produce, and where each is checked instead
NEVER_HERE = {
    "hidden_state_transfer_seconds": "needs the Ray executor (test_cluster)",
    "hidden_state_transfer_bytes": "needs the Ray executor (test_cluster)",
    "drafter_fallbacks": "needs a drafter loss (test_cluster)",
    "drafter_restarts": "needs a drafter loss (test_cluster)",
    "num_preemptions": "needs a full cache (test_exporter_counts_what_the_outputs_say)",
}


OWN = {label for m in METRICS.values() for label in m.labels} | {"le"}


def samples(text: str, prefix: str = "ray_") -> dict[str, float]:
    """Exported name (with the labels that are not model_name/replica) -> value summed over
    model_name and replica."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith(prefix + "dflash_"):
                continue
            # our own labels only (Ray adds its worker, session, version and otel scope)
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in OWN)
            key = f"{s.name}{{{extra}}}" if extra else s.name
            out[key] = out.get(key, 0.0) + s.value
    return out


def value(s: dict[str, float], name: str, prefix: str = "ray_") -> float:
    return s.get(METRICS[name].exported_name(ray=False).replace("dflash_", prefix + "dflash_", 1),
                 0.0)


def test_dashboard_file_is_the_generators_output():
    assert (ROOT / "dashboards" / "dflash.json").read_text() == render()
    names = {m.full_name for m in METRICS.values()}
    exprs = " ".join(e for p in PANELS for e, _ in p.targets)
    # every speculation counter and latency histogram has a panel
    for name in ("spec_decode_num_drafts", "spec_decode_num_accepted_tokens_per_pos",
                 "time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "kv_cache_usage_perc", "drafter_up"):
        assert f"dflash_{name}" in exprs and f"dflash_{name}" in names


def test_exporter_counts_what_the_outputs_say(tiny):
    """The offline exporter (prometheus_client): counters equal the outputs' own numbers, with
    preemptions from a cache too small for the batch."""
    from prometheus_client import generate_latest

    from dflash_ray.metrics.exporter import Exporter
    from dflash_ray.metrics.prometheus import PrometheusBackend

    llm = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32", spec_profile="whole_block",
              kv_block_len=4,
              num_kv_blocks=40)
    backend = PrometheusBackend()
    exporter = Exporter(backend, "tiny")
    llm.engine.add_listener(exporter.on_step, exporter.on_outputs)
    prompts = [[(3 * i + j) % 30 for j in range(5 + i)] for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=60), use_tqdm=False)
    aborted = llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=60))
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.abort(aborted)  # ends outside a step: reaches the exporter all the same
    exporter.sample(llm.engine)  # counters reach the backend once a second, or when sampled
    s = samples(generate_latest(backend.registry).decode(), prefix="")
    generated = llm.engine.stats().counters.generation_tokens
    assert value(s, "generation_tokens", "") == generated > sum(len(o.token_ids) for o in outs)
    assert value(s, "prompt_tokens", "") == sum(len(p) for p in prompts) + 3
    assert s["dflash_request_success_total{finished_reason=abort}"] == 1
    assert exporter._last_token == {}  # no request's state outlives it
    spec = llm.engine.stats().counters.spec  # the aborted request's drafts included
    assert value(s, "spec_decode_num_drafts", "") == spec.num_drafts >= sum(
        len(o.acceptance_lengths) for o in outs)
    assert value(s, "spec_decode_num_accepted_tokens", "") == spec.num_accepted_tokens
    assert value(s, "num_preemptions", "") == llm.engine.stats().counters.num_preemptions > 0
    assert s["dflash_request_success_total{finished_reason=length}"] == len(outs)
    assert s["dflash_time_to_first_token_seconds_count"] == len(outs) + 1


@pytest.fixture(scope="module")
def app(ray_cluster, tiny, tmp_path_factory):
    """The Serve app with metrics on (its default), on a Serve instance of its own."""
    from ray import serve

    from dflash_ray.server.app import build_app

    d = tmp_path_factory.mktemp("metrics") / "moe"
    shutil.copytree(tiny["moe"], d)
    add_char_tokenizer(d)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_name": "tiny", "engine": {"target": str(d),
                                                          "drafter": tiny["drafter"],
                                                          "spec_profile": "whole_block"}}),
              name="metrics", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    node = next(n for n in ray_cluster.nodes() if n["Alive"])
    yield base, f"127.0.0.1:{node['MetricsExportPort']}"
    serve.shutdown()


def scrape(target: str) -> dict[str, float]:
    return samples(httpx.get(f"http://{target}/metrics", timeout=10).text)


def traffic(base: str) -> list[dict]:
    """A mix of requests; their usage blocks."""
    bodies = [{"prompt": f"req {i} " + "ab" * i, "max_tokens": 12 + 3 * i, "temperature": 0}
              for i in range(4)]
    bodies.append({"prompt": "hello", "max_tokens": 20, "temperature": 0.8, "seed": 3, "n": 2})
    bodies.append({"prompt": "hello world", "max_tokens": 16, "temperature": 0,
                   "stop_token_ids": [5]})
    usages = []
    for b in bodies:
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", **b}, timeout=60)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    assert httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x"},
                      timeout=30).status_code == 404  # an error for the error-rate panel
    # a stream, for the inter-token histogram's deltas
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "abc", "max_tokens": 30, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    usages.append(json.loads(lines[-1][6:])["usage"])
    return usages


def test_ray_metrics_agent_exports_what_the_usage_said(app):
    base, target = app
    before = scrape(target)
    usages = traffic(base)
    want = {"generation_tokens": sum(u["completion_tokens"] for u in usages),
            "prompt_tokens": sum(u["prompt_tokens"] for u in usages),
            "spec_decode_num_drafts": sum(u["num_drafts"] for u in usages),
            "spec_decode_num_draft_tokens": sum(u["num_draft_tokens"] for u in usages),
            "spec_decode_num_accepted_tokens": sum(u["num_accepted_tokens"] for u in usages)}
    deadline = time.monotonic() + 60  # the agent exports every second here (conftest)
    while True:
        after = scrape(target)
        got = {k: value(after, k) - value(before, k) for k in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == want
    accepted, drafts = got["spec_decode_num_accepted_tokens"], got["spec_decode_num_drafts"]
    assert 0 <= accepted <= got["spec_decode_num_draft_tokens"] and drafts > 0
    assert 1.0 <= 1 + accepted / drafts <= 8  # the tiny drafter's B
    finished = sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k.startswith("ray_dflash_request_success_total"))
    assert finished == len(usages) + 1  # the n=2 request is two engine requests
    exported = {k.split("{")[0] for k in after}
    for m in METRICS.values():
        if m.name in NEVER_HERE:
            continue
        base_name = m.exported_name()
        assert base_name in exported or f"{base_name}_count" in exported, m.name


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory):
    """A real Prometheus (Debian's), scraping Ray's metrics agent every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run does)")
    _, target = app
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n- job_name: ray\n  static_configs:\n  - targets: ['{target}']\n")
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=5)
            except httpx.HTTPError:
                resp = None  # not listening yet
            # until its storage is open, Prometheus answers 503 "Service Unavailable" (no JSON)
            if resp is not None and resp.status_code == 200:
                r = resp.json()["data"]["result"]
                if r and r[0]["value"][1] == "1":
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError("prometheus never scraped the Ray metrics agent")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(app, prometheus, tmp_path):
    base, _ = app
    traffic(base)
    time.sleep(5)  # a few scrapes after the traffic
    results = {}
    for panel in PANELS:
        for expr, _ in panel.targets:
            q = fill(expr, "ray_", ".*", ".*", "2m")
            body = httpx.get(f"{prometheus}/api/v1/query", params={"query": q},
                             timeout=30).json()
            assert body["status"] == "success", (panel.title, q, body)
            results[(panel.title, expr)] = body["data"]["result"]
    empty = [title for (title, _), r in results.items() if not r]
    assert not empty, f"panels without data after traffic: {empty}"
    tau = float(results[(PANELS[0].title, PANELS[0].targets[0][0])][0]["value"][1])
    assert 1.0 <= tau <= 8.0
    # the snapshot command draws the same queries from the same Prometheus
    from dflash_ray.cli import main

    assert main(["dashboard-snapshot", "--prometheus", prometheus, "--out", str(tmp_path),
                 "--minutes", "3"]) == 0
    png = tmp_path / "dashboard.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    drawn = json.loads((tmp_path / "dashboard.json").read_text())
    assert set(drawn) == {p.title for p in PANELS} and all(n > 0 for n in drawn.values())


def test_watched_exporter_records_nothing_on_the_stepping_thread(tiny):
    """With a watcher running, steps only queue their observations; the watcher's sample hands
    every one of them to the backend (here a real prometheus_client registry)."""
    from prometheus_client import generate_latest

    from dflash_ray.metrics.exporter import Exporter
    from dflash_ray.metrics.prometheus import PrometheusBackend

    llm = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32")
    backend = PrometheusBackend()
    exporter = Exporter(backend, "tiny")
    llm.engine.add_listener(exporter.on_step, exporter.on_outputs)
    exporter.watch(llm.engine, interval_s=3600)  # its one sample now; no other while we look
    try:
        prompts = [[(2 * i + j) % 30 for j in range(4 + i)] for i in range(3)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=12), use_tqdm=False)
        before = samples(generate_latest(backend.registry).decode(), prefix="")
        assert before.get("dflash_time_to_first_token_seconds_count", 0) == 0
        assert before.get("dflash_inter_token_latency_seconds_count", 0) == 0
        assert value(before, "generation_tokens", "") == 0
        exporter.sample(llm.engine)
        after = samples(generate_latest(backend.registry).decode(), prefix="")
    finally:
        exporter.close()
    assert after["dflash_time_to_first_token_seconds_count"] == len(outs)
    assert after["dflash_e2e_request_latency_seconds_count"] == len(outs)
    assert after["dflash_verify_step_seconds_count"] == llm.engine.stats().counters.num_steps
    assert value(after, "generation_tokens", "") == sum(len(o.token_ids) for o in outs)
