"""The non-RPC HTTP routes served beside the transcoded RPCs: ``GET /`` and ``GET /metrics``.

(``GET /openapi.json`` is the transcoder's own, ``gateway.transcoding.openapi``.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib.metadata import version

import orjson
from aiohttp import web

from gateway.rpc.metrics import Metrics, Snapshot
from gateway.transcoding.routes import ExtraRoute


def metrics_route(
    metrics: Metrics, others: Callable[[], Awaitable[Sequence[Snapshot]]] | None = None
) -> ExtraRoute:
    """GET /metrics: Prometheus metrics of every call, both protocols (and every worker: ``others``)."""

    async def handler(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        body, content_type = metrics.exposition(await others() if others is not None else ())
        return web.Response(body=body, headers={"Content-Type": content_type})

    return ExtraRoute(method="GET", template="/metrics", handler=handler)


def root_route() -> ExtraRoute:
    """GET /: what this is and where to look next (the Memphis REST gateway answered here too)."""
    body = orjson.dumps({"service": "memphis-gateway", "version": version("memphis-gateway"),
                         "openapi": "/openapi.json", "metrics": "/metrics", "status": "/monitoring/status"})

    async def handler(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return ExtraRoute(method="GET", template="/", handler=handler)


def live_route() -> ExtraRoute:
    """GET /monitoring/live: 200 while the process serves HTTP (a liveness probe; /monitoring/status is
    readiness: 503 while the broker is unreachable)."""
    body = orjson.dumps({"status": "alive"})

    async def handler(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return ExtraRoute(method="GET", template="/monitoring/live", handler=handler)
