"""Turning the engine's numbers into Prometheus metrics: the catalog of names (`catalog`), the
exporter that reads every step (`exporter`), and the backends it writes through: Ray's metrics
agent (`dflash_ray.server.ray_metrics`, in a Serve replica) or `prometheus_client` with its own
HTTP server (`prometheus`, offline engines). The core counts, this edge exports."""
