"""The Grafana dashboard, defined next to the metrics it reads: every panel's PromQL, and the
dashboard JSON built from them (`dashboards/dflash.json` is this module's output, checked equal
by a test; regenerate with `python3 -m dflash_ray.metrics.dashboard > dashboards/dflash.json`).

Queries use the dashboard's variables: `$prefix` (`ray_` for the Serve app, empty for an
offline engine's prometheus_client exporter), `$model_name`, `$replica`, and Grafana's
`$__rate_interval`. Ratios divide by `(... > 0)` and quantiles keep only windows with traffic,
so an idle server's panels read "no traffic" instead of NaN. The Ray Serve panels read Ray
Serve's own metrics (always `ray_`-prefixed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SEL = '{model_name=~"$model_name", replica=~"$replica"}'
RATE = "$__rate_interval"


def m(name: str) -> str:
    return f"${{prefix}}dflash_{name}"


def rate(name: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({m(name)}{SEL}[{RATE}]))"


def quantiles(name: str) -> list[tuple[str, str]]:
    traffic = f"sum(rate({m(name)}_count{SEL}[{RATE}])) > 0"
    return [(f"histogram_quantile({q}, sum by (le) (rate({m(name)}_bucket{SEL}[{RATE}]))) "
             f"and on() ({traffic})", f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


def per_step(name: str) -> str:
    return (f"{rate(name + '_sum')} / ({rate(name + '_count')} > 0)")


@dataclass(frozen=True)
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    extra: dict = field(default_factory=dict)


SERVE = 'application=~".*"'
PANELS: list[Panel] = [
    Panel("Acceptance length (τ)",
          [(f"1 + {rate('spec_decode_num_accepted_tokens_total')} / "
            f"({rate('spec_decode_num_drafts_total')} > 0)", "τ")],
          description="Tokens committed per verify step that carried drafts, bonus included"),
    Panel("Acceptance rate by draft position",
          [(f"{rate('spec_decode_num_accepted_tokens_per_pos_total', 'position')} / on() "
            f"group_left() ({rate('spec_decode_num_drafts_total')} > 0)", "position {{position}}")],
          unit="percentunit"),
    Panel("Output tokens from drafts",
          [(f"{rate('spec_decode_num_accepted_tokens_total')} / "
            f"({rate('generation_tokens_total')} > 0)", "accepted drafts / output tokens")],
          unit="percentunit"),
    Panel("Speculative vs plain steps",
          [(rate("engine_steps_total", "kind"), "{{kind}}"),
           (f"max({m('spec_decode_enabled')}{SEL})", "policy speculates")],
          unit="ops"),
    Panel("Drafter health",
          [(f"min({m('drafter_up')}{SEL})", "drafter up"),
           (f"sum(increase({m('drafter_fallbacks_total')}{SEL}[1h])) or vector(0)",
            "fallbacks (1h)"),
           (f"sum(increase({m('drafter_restarts_total')}{SEL}[1h])) or vector(0)",
            "restarts (1h)")]),
    Panel("Throughput",
          [(rate("generation_tokens_total"), "generated tok/s"),
           (rate("prompt_tokens_total"), "prompt tok/s")],
          unit="short"),
    Panel("Time to first token", quantiles("time_to_first_token_seconds"), unit="s"),
    Panel("Inter-token latency", quantiles("inter_token_latency_seconds"), unit="s"),
    Panel("End-to-end latency", quantiles("e2e_request_latency_seconds"), unit="s"),
    Panel("Queue time", quantiles("request_queue_time_seconds"), unit="s"),
    Panel("Requests running / waiting",
          [(f"sum({m('num_requests_running')}{SEL})", "running"),
           (f"sum({m('num_requests_waiting')}{SEL})", "waiting")]),
    Panel("KV cache usage",
          [(f"max by (cache) ({m('kv_cache_usage_perc')}{SEL})", "{{cache}}")],
          unit="percentunit"),
    Panel("Time per step: draft, verify, transfer",
          [(per_step("draft_step_seconds"), "draft"),
           (per_step("verify_step_seconds"), "verify"),
           (f"{per_step('hidden_state_transfer_seconds')} or vector(0)", "transfer")],
          unit="s"),
    Panel("Finished requests",
          [(rate("request_success_total", "finished_reason"), "{{finished_reason}}")],
          unit="reqps"),
    Panel("Serve: HTTP requests",
          [(f"sum by (status_code) (rate(ray_serve_num_http_requests_total{{{SERVE}}}"
            f"[{RATE}]))", "{{status_code}}")], unit="reqps"),
    Panel("Serve: HTTP error rate",
          [(f"(sum(rate(ray_serve_num_http_error_requests_total{{{SERVE}}}[{RATE}])) or "
            f"vector(0)) / (sum(rate(ray_serve_num_http_requests_total{{{SERVE}}}[{RATE}])) "
            "> 0)", "errors / requests")], unit="percentunit"),
    Panel("Serve: live replicas",
          [(f"count by (deployment) (ray_serve_replica_processing_queries{{{SERVE}}})",
            "{{deployment}}")],
          description="Replicas reporting Ray Serve's per-replica gauge (a dead replica stops "
                      "reporting within seconds)"),
]


def variables() -> list[dict]:
    label_source = "${prefix}dflash_engine_steps_total"

    def query_var(name: str) -> dict:
        return {"name": name, "type": "query", "label": name,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": f"label_values({label_source}, {name})", "refId": name},
                "definition": f"label_values({label_source}, {name})",
                "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
                "current": {"text": "All", "value": "$__all"}}

    return [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
         "current": {}},
        {"name": "prefix", "type": "custom", "label": "metric prefix",
         "description": "ray_ for the Serve app (Ray's metrics agent), empty for an offline "
                        "engine's prometheus_client exporter",
         "query": "ray_,", "options": [{"text": "ray_", "value": "ray_", "selected": True},
                                       {"text": "(none)", "value": "", "selected": False}],
         "current": {"text": "ray_", "value": "ray_"}},
        query_var("model_name"),
        query_var("replica"),
    ]


def dashboard() -> dict:
    panels = []
    for i, p in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": p.kind,
            "title": p.title,
            "description": p.description,
            "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": (i // 3) * 8},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": p.unit, "noValue": "no traffic"},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(p.targets)],
            **p.extra,
        })
    return {
        "uid": "dflash-ray",
        "title": "dflash-ray: DFlash speculative decoding",
        "tags": ["dflash-ray", "ray-serve", "speculative-decoding"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": variables()},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
