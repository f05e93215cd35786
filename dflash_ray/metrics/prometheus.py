"""The `prometheus_client` backend, for engines outside Ray Serve (`LLM`, `dflash-ray bench
--metrics-port`): the catalog's metrics in a registry of their own, served over HTTP."""

from __future__ import annotations

import prometheus_client as pc

from .catalog import COMMON_LABELS, Metric


class _Handle:
    def __init__(self, metric, kind: str):
        self._m, self._kind = metric, kind

    def inc(self, value: float, labels: dict[str, str]) -> None:
        self._m.labels(**labels).inc(value)

    def set(self, value: float, labels: dict[str, str]) -> None:
        self._m.labels(**labels).set(value)

    def observe(self, value: float, labels: dict[str, str]) -> None:
        self._m.labels(**labels).observe(value)


class PrometheusBackend:
    def __init__(self, registry: pc.CollectorRegistry | None = None):
        self.registry = registry or pc.CollectorRegistry()

    def make(self, metric: Metric) -> _Handle:
        labels = COMMON_LABELS + metric.labels
        kw = dict(registry=self.registry)
        if metric.kind == "counter":
            m = pc.Counter(metric.full_name, metric.help, labels, **kw)
        elif metric.kind == "gauge":
            m = pc.Gauge(metric.full_name, metric.help, labels, **kw)
        else:
            m = pc.Histogram(metric.full_name, metric.help, labels, buckets=metric.buckets, **kw)
        return _Handle(m, metric.kind)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose the registry on http://host:port/metrics (a daemon thread)."""
        pc.start_http_server(port, addr=host, registry=self.registry)
