"""The non-RPC HTTP routes served beside the transcoded RPCs: ``GET /``, ``/metrics``,
``/monitoring/live`` and the API docs at ``/docs``.

(``GET /openapi.json`` is the transcoder's own, ``gateway.transcoding.openapi``.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
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
                         "docs": "/docs", "openapi": "/openapi.json", "metrics": "/metrics",
                         "status": "/monitoring/status"})

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


# Swagger UI 5 (it renders OpenAPI 3.1), from the swagger-ui-py wheel's static files: served from
# here, no CDN. Only these files are served.
_DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}
_DOCS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>memphis-gateway API</title>
  <link rel="icon" href="/docs/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                                 persistAuthorization: true});
  </script>
</body>
</html>
"""


def docs_routes() -> tuple[ExtraRoute, ExtraRoute]:
    """GET /docs: the OpenAPI document rendered by Swagger UI (try requests with a token from
    POST /auth/authenticate under "Authorize"); GET /docs/{file}: its static files."""
    static = resources.files("swagger_ui") / "static"

    async def page(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        return web.Response(body=_DOCS_PAGE, content_type="text/html", charset="utf-8")

    async def asset(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        name = params["file"]
        kind = _DOCS_FILES.get(name)
        if kind is None:
            return web.Response(status=404, body=orjson.dumps({"code": 5, "message": f"no docs file {name!r}"}),
                                content_type="application/json")
        body = (static / name).read_bytes()
        return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "public, max-age=86400"})

    return (ExtraRoute(method="GET", template="/docs", handler=page),
            ExtraRoute(method="GET", template="/docs/{file}", handler=asset))
