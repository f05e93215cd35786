"""The Ray backend: the catalog's metrics as `ray.util.metrics`, recorded in the Serve replica
and exported by the node's Ray metrics agent (the port KubeRay's PodMonitor scrapes, 8080 there;
`ray start --metrics-export-port` fixes it elsewhere). Ray prefixes `ray_` and adds `_total` to
counters (see `metrics/catalog.py`).

Kept in a module of its own: metrics defined in the same module as a deployment class would be
pickled with it by value and never exported."""

from __future__ import annotations

from ray.util import metrics as rm

from ..metrics.catalog import COMMON_LABELS, Metric


class _Handle:
    def __init__(self, metric):
        self._m = metric

    def inc(self, value: float, labels: dict[str, str]) -> None:
        if value:  # Ray refuses to add 0
            self._m.inc(value, tags=labels)

    def set(self, value: float, labels: dict[str, str]) -> None:
        self._m.set(value, tags=labels)

    def observe(self, value: float, labels: dict[str, str]) -> None:
        self._m.observe(value, tags=labels)


class RayBackend:
    def make(self, metric: Metric) -> _Handle:
        keys = COMMON_LABELS + metric.labels
        if metric.kind == "counter":
            m = rm.Counter(metric.full_name, metric.help, tag_keys=keys)
        elif metric.kind == "gauge":
            m = rm.Gauge(metric.full_name, metric.help, tag_keys=keys)
        else:
            m = rm.Histogram(metric.full_name, metric.help, boundaries=list(metric.buckets),
                             tag_keys=keys)
        return _Handle(m)
