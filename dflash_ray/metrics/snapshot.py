"""`dflash-ray dashboard-snapshot`: the dashboard as one PNG, without Grafana.

Evaluates every panel's queries over the last N minutes through Prometheus' HTTP API
(`/api/v1/query_range`, the dashboard's variables filled in) and draws the panels in the
dashboard's own grid. A panel whose queries return nothing reads "no traffic", as in Grafana.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path

from .dashboard import PANELS, Panel


def fill(expr: str, prefix: str, model_name: str, replica: str, rate_interval: str) -> str:
    """A dashboard expression with its variables replaced, as Grafana would send it."""
    return (expr.replace("${prefix}", prefix).replace("$model_name", model_name)
            .replace("$replica", replica).replace("$__rate_interval", rate_interval))


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """The result series of one range query; raises ValueError with Prometheus' error."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/query_range?{params}",
                                timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType')}: {body.get('error')} in {expr!r}")
    return body["data"]["result"]


def legend(template: str, labels: dict) -> str:
    out = template
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def snapshot(url: str, out_dir: str, minutes: float = 15.0, prefix: str = "ray_",
             model_name: str = ".*", replica: str = ".*", panels: list[Panel] = PANELS) -> dict:
    """Draw `panels` into OUT/dashboard.png; returns {panel title: series drawn}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - 60 * minutes
    step = max(1.0, 60 * minutes / 240)
    rate_interval = f"{max(15, int(4 * step))}s"
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    drawn: dict[str, int] = {}
    for ax, panel in zip(axes.flat, panels, strict=False):
        n = 0
        for expr, template in panel.targets:
            for series in query_range(url, fill(expr, prefix, model_name, replica,
                                                rate_interval), start, end, step):
                ts = [(float(t) - end) / 60 for t, v in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                ax.plot(ts, vs, label=legend(template, series["metric"]) or None)
                n += 1
        drawn[panel.title] = n
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlim(-minutes, 0)
        ax.set_xlabel("minutes ago", fontsize=8)
        ax.tick_params(labelsize=8)
        if n:
            ax.set_ylabel(panel.unit, fontsize=8)
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no traffic", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"dflash-ray — last {minutes:g} min ({url})", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "dashboard.png", dpi=80)
    plt.close(fig)
    (out / "dashboard.json").write_text(json.dumps(drawn, indent=1))
    return drawn
