"""Ray Serve's own settings for streaming many small deltas, in one place.

A token stream is many small messages: at concurrency 8 the model replica sends about one
delta per request per engine step. Serve's defaults are tuned for fewer, larger requests, and
on the 2-core development box its per-message work took the CPU the engine needs (Serve
streaming at 0.50x in-process tok/s). Ray reads these environment variables once, when a
process imports `ray.serve`, so they are environment, not code:

- `REPLICA_ENV`, for the replicas (each deployment YAML's `runtime_env.env_vars` carries them;
  tests/test_deployments.py holds the YAMLs to this dict): the replica runs our async
  generators on its own event loop instead of handing each one to a second loop in another
  thread, and the ingress's router to the model server runs on that loop too.
- `PROXY_ENV`, for the HTTP proxy: it forwards requests to the ingress over gRPC instead of
  one Ray object per message. The proxy starts with the cluster, so this goes where the
  cluster is started: `export RAY_SERVE_PROXY_USE_GRPC=1` before `serve run` or `ray start`,
  the container env of k8s/rayservice.yaml.

The third part of the same change is in code: the ingress reads the model server's streams
over Serve's gRPC channel between replicas (`app.HandleBackend`). Together they are
`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` without its direct ingress (replicas listening on ports
30000+ instead of the proxy's 8000). Measured in docs/benchmarks.md (Serve streaming).

No Ray import here: the driver must set these before anything imports `ray.serve`.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
PROXY_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}
SERVE_ENV = {**REPLICA_ENV, **PROXY_ENV}


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set every setting the environment does not already set (a local Ray started after this
    gives them to every process it starts: proxy, controller, replicas)."""
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
