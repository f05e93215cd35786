"""`build_app(args)`: the Serve application behind `serve run deployments/dflash.yaml`.

Two deployments: `Ingress` (FastAPI, OpenAI routes) and `DFlashServer` (one Engine per replica).
Engine construction is data (`engine` args -> EngineConfig), so tests and YAMLs pick the models.

With `direct_streaming` the model-server replica serves the routes itself (one deployment,
`DFlashDirect`): every delta crosses one process boundary (replica -> HTTP proxy) instead of
two (replica -> ingress -> proxy), as Ray Serve LLM's direct streaming does. What it gives up:
when a replica dies, nothing is left to tell its streams why (the proxy ends them without an
error event or `[DONE]`), and the HTTP work shares the engine's process.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from ..cluster.launch import node_ip
from ..config import EngineConfig
from .ingress import IngressSettings, make_api
from .model_server import ModelServer
from .push import PushedStream, PushHub
from .ray_metrics import RayBackend


class AppArgs(BaseModel):
    """The `args:` block of a Serve config for this app."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("dflash-demo", description="the name clients send as `model`")
    demo: bool = Field(False, description="serve the trained pair shipped with the package")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields")
    max_pending: int = Field(256, ge=1, description="requests in flight before 503")
    deep_health_ttl_s: float = Field(5.0, ge=0, description="how long one /health/deep check "
                                     "(a model pass) answers every caller")
    metrics: bool = Field(True, description="export the engine's metrics through Ray's metrics "
                          "agent (names in dflash_ray/metrics/catalog.py)")
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    direct_streaming: bool = Field(False, description="the model server serves HTTP itself: "
                                   "one hop per delta instead of two; a replica's death then "
                                   "ends its streams without an error event (module docstring)")
    grpc_streams: bool = Field(True, description="the ingress reads the model server's streams "
                               "over Serve's gRPC channel between replicas (orjson items) "
                               "instead of one Ray object per delta")
    push_streams: bool = Field(True, description="the model server pushes the deltas of all "
                               "of an ingress's streams that one step made as one message over "
                               "a socket per (model replica, ingress replica); each request "
                               "stays one Serve call for routing, accounting and cancellation "
                               "(server/push.py)")

    @model_validator(mode="after")
    def _models(self) -> AppArgs:
        if self.demo:
            from ..demo import demo_pair

            target, drafter = demo_pair()
            self.engine.setdefault("target", target)
            self.engine.setdefault("drafter", drafter)
        EngineConfig(**self.engine)  # fail at deploy time, naming the bad field
        self.ingress.model_name = self.model_name
        return self


def _log_through_serve() -> None:
    """In a replica, dflash_ray's log records (the model server's "ready" line, request
    failures with their tracebacks) go where Serve's own go: the replica's log file and the
    console of `serve run`, with Serve's request ids. Without this only warnings reach stderr."""
    ours, serves = logging.getLogger("dflash_ray"), logging.getLogger("ray.serve")
    ours.handlers = list(serves.handlers)
    ours.setLevel(logging.INFO)
    ours.propagate = False


class ReplicaModelServer(ModelServer):
    """A `ModelServer` in a Serve replica: Serve's logging, the replica's tag, Ray's metrics."""

    def __init__(self, engine_config: dict, model_name: str, max_pending: int, metrics: bool,
                 deep_health_ttl_s: float):
        _log_through_serve()
        replica = serve.get_replica_context().replica_tag
        super().__init__(engine_config, model_name, max_pending,
                         RayBackend() if metrics else None, replica, deep_health_ttl_s)


DFlashServer = serve.deployment(name="DFlashServer", max_ongoing_requests=512)(
    ReplicaModelServer)


class HandleBackend:
    """The ingress's view of the model server through a Serve deployment handle.

    With `push`, a request is one call whose items the model server pushes back over a socket
    of this ingress replica's, every step's deltas for all its streams in one message
    (server/push.py). Else with `grpc`, streams come over Serve's direct gRPC channel between
    replicas (every replica serves one) with orjson-encoded items, instead of one Ray object per
    delta through the object store: what `RAY_SERVE_USE_GRPC_BY_DEFAULT` turns on for every
    handle. The deltas are plain dicts of text, ints and lists, which orjson encodes. Measured
    in docs/benchmarks.md (Serve's own settings for token streams, pushed streams)."""

    def __init__(self, handle, grpc: bool = True, push: bool = True):
        self.handle = handle
        options = {"_by_reference": False, "response_serialization": "orjson"} if grpc else {}
        self._streaming = handle.options(stream=True, **options)  # made once, not per request
        self._unary = handle.options(**options)
        self.hub = PushHub(node_ip()) if push else None

    def generate(self, prompt, messages, params, request_id: str):
        if self.hub is None:
            return self._streaming.generate.remote(prompt, messages, params, request_id)
        calls = []

        async def start():
            address = await self.hub.start()
            calls.append(self._unary.generate_pushed.remote(prompt, messages, params, request_id,
                                                            address, self.hub.token))
            return await calls[0]

        return PushedStream(self.hub, request_id, start, lambda: [c.cancel() for c in calls])

    async def call(self, method: str):
        return await getattr(self.handle, method).remote()


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    def __init__(self, server, settings: dict, grpc_streams: bool = True,
                 push_streams: bool = True):
        _log_through_serve()
        self.backend = HandleBackend(server, grpc_streams, push_streams)
        self.settings = IngressSettings(**settings)

    def __serve_build_asgi_app__(self):
        return make_api(lambda: self.backend, self.settings)


class LocalBackend:
    """The routes' view of a model server in the same process (`direct_streaming`)."""

    def __init__(self, server: ModelServer):
        self.server = server

    def generate(self, prompt, messages, params, request_id: str):
        return self.server.generate(prompt, messages, params, request_id)

    async def call(self, method: str):
        result = getattr(self.server, method)()
        return await result if inspect.isawaitable(result) else result


@serve.deployment(name="DFlashDirect", max_ongoing_requests=1024)
@serve.ingress()
class DFlashDirect(ReplicaModelServer):
    def __init__(self, engine_config: dict, model_name: str, max_pending: int, metrics: bool,
                 deep_health_ttl_s: float, settings: dict):
        super().__init__(engine_config, model_name, max_pending, metrics, deep_health_ttl_s)
        self.backend = LocalBackend(self)
        self.settings = IngressSettings(**settings)

    def __serve_build_asgi_app__(self):
        return make_api(lambda: self.backend, self.settings)


def build_app(args: dict) -> serve.Application:
    a = AppArgs(**args)
    if a.direct_streaming:
        return DFlashDirect.bind(a.engine, a.model_name, a.max_pending, a.metrics,
                                 a.deep_health_ttl_s, a.ingress.model_dump())
    server = DFlashServer.bind(a.engine, a.model_name, a.max_pending, a.metrics,
                               a.deep_health_ttl_s)
    return Ingress.bind(server, a.ingress.model_dump(), a.grpc_streams, a.push_streams)
