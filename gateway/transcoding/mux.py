"""Routing (grpc-gateway's ``ServeMux``): which binding serves a request, or 404 / 405.

The first binding, in declaration order, whose method and template match wins. A path that
matches none exactly is tried again as the upstream gateway (fiber's defaults) routes it:
literal segments case-insensitively and a trailing slash ignored (``/Stations/x/Produce/Single/``);
captured values (station names) keep their case. A path that matches only under another
method is 405, anything else 404, both in the error shape of the route family the path
belongs to (``/auth/...``: ``{"message"}``, ``/stations/...``: ``{"error", "success"}``) with a
hint. Non-RPC routes (``ExtraRoute``) use the same template syntax, after the RPCs. Recent
(method, path) matches are cached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from aiohttp import web

from gateway.core.budget import Budget
from gateway.core.errors import GatewayError, Internal, InvalidArgument
from gateway.rpc.call import Endpoint
from gateway.transcoding.bindings import build_bindings
from gateway.transcoding.cors import Cors
from gateway.transcoding.forward import Serve, forwarder
from gateway.transcoding.pathtemplate import MalformedPathError, PathTemplate, compile_template, split_path, unescape
from gateway.transcoding.requests import expect, send_continue
from gateway.transcoding.responses import error_response
from gateway.transcoding.routes import ExtraRoute

log = logging.getLogger("gateway.rest")
ROUTE_CACHE_SIZE = 1024  # recent (method, raw path) -> RPC route and captures


@dataclass(frozen=True, slots=True, kw_only=True)
class RestOptions:
    cors_origins: tuple[str, ...] = ("*",)
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 30.0  # unary calls; streams only get a deadline from Grpc-Timeout
    body_read_timeout_s: float = 10.0  # a body not all received by then is 408 (streams: no data for this long)
    max_inflight_body_bytes: int = 64 * 1024 * 1024  # request bodies held at once, all requests; beyond: 503
    extra_routes: tuple[ExtraRoute, ...] = ()
    allow_delete_body: bool = False
    unbound_methods: bool = False  # POST /<pkg.Service>/<Method> for methods without google.api.http


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    template: PathTemplate
    serve: Serve  # (request, captured, query_string, cors headers)
    first: str | None = None  # template.first_literal, looked up once
    rpc: bool = True  # False for an ExtraRoute
    shape: int = 0  # the error body shape of its family (options_pb2.ErrorBody)

    @classmethod
    def of(cls, method: str, template: PathTemplate, serve: Serve, rpc: bool = True, shape: int = 0) -> _Route:
        return cls(method, template, serve, template.first_literal, rpc, shape)


class Mux:
    def __init__(self, endpoints: list[Endpoint], options: RestOptions) -> None:
        self.options = options
        self.limit = options.max_body_bytes
        self.timeout = options.request_timeout_s
        self.cors = Cors(options.cors_origins)
        self.budget = Budget(options.max_inflight_body_bytes, "request bodies in flight")
        bindings = build_bindings(
            endpoints, allow_delete_body=options.allow_delete_body, unbound_methods=options.unbound_methods
        )
        routes = [
            _Route.of(b.http_method, b.template, forwarder(
                b, limit=self.limit, timeout=self.timeout, body_timeout=options.body_read_timeout_s,
                budget=self.budget,
            ), shape=b.error_body) for b in bindings
        ]
        for extra in options.extra_routes:
            routes.append(_Route.of(extra.method.upper(), compile_template(extra.template), self._extra(extra), False))
        self.routes = tuple(routes)
        by_method: dict[str, list[_Route]] = {}
        for r in routes:
            by_method.setdefault(r.method, []).append(r)
        self.by_method = {m: tuple(rs) for m, rs in by_method.items()}
        self.recent: dict[tuple[str, str], tuple[_Route, Mapping[str, str]]] = {}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if "Expect" in request.headers:
            refused = expect(request)
            if refused is not None:
                return refused
        cors = self.cors.headers(request)
        raw = request.raw_path
        if not raw.startswith("/"):  # absolute-form request target
            raw = request.rel_url.raw_path_qs
        path, _, query_string = raw.partition("?")
        method = request.method
        hit = self.recent.get((method, path))
        if hit is not None:  # clients call the same few paths over and over: skip the matching
            return await hit[0].serve(request, hit[1], query_string, cors)
        try:
            components = split_path(path.partition("#")[0])
            first = components[0]
            if "%" in first:
                first = unescape(first)
            for route in self.by_method.get(method, ()):
                if route.first is not None and route.first != first:
                    continue
                params = route.template.match_components(components)
                if params is not None:
                    return await route.serve(request, self._remember(method, path, route, params), query_string, cors)
            if len(components) > 1 and components[-1] == "":  # upstream: a trailing slash is ignored
                components = components[:-1]
            lowered = first.lower()
            for route in self.by_method.get(method, ()):  # upstream: paths are case-insensitive
                if route.first is not None and route.first.lower() != lowered:
                    continue
                params = route.template.match_components(components, fold=True)
                if params is not None:
                    return await route.serve(request, self._remember(method, path, route, params), query_string, cors)
            if method == "HEAD":
                for route in self.by_method.get("GET", ()):
                    params = route.template.match_components(components, fold=True)
                    if params is not None:
                        return await route.serve(request, params, query_string, cors)
            allowed = [r for r in self.routes if r.template.match_components(components, fold=True) is not None]
        except MalformedPathError as exc:
            return error_response(InvalidArgument(str(exc)), 0, cors)
        methods = list(dict.fromkeys(r.method for r in allowed))
        if not methods:
            err = GatewayError(f"Not Found: no route {method} {_shown(path)}; GET /docs lists the API",
                               http_status=404, code=grpc.StatusCode.NOT_FOUND)
            return error_response(err, self._family_shape(lowered), cors)
        if method == "OPTIONS":
            return Cors.preflight(request, methods, cors)
        err = GatewayError(f"Method Not Allowed: use {' or '.join(methods)} for {_shown(path)}",
                           http_status=405, code=grpc.StatusCode.UNIMPLEMENTED)
        return error_response(err, allowed[0].shape, {**cors, "Allow": ", ".join(methods)})

    def _family_shape(self, first: str) -> int:
        """The error shape of the routes whose first segment is ``first`` (0: grpc-gateway's)."""
        for r in self.routes:
            if r.rpc and r.first is not None and r.first.lower() == first:
                return r.shape
        return 0

    def _remember(self, method: str, path: str, route: _Route, params: dict[str, str]) -> Mapping[str, str]:
        """Cache an RPC route match (read-only captures: every later request shares them)."""
        if not route.rpc:
            return params
        if len(self.recent) >= ROUTE_CACHE_SIZE:
            self.recent.clear()
        frozen = MappingProxyType(params)
        self.recent[(method, path)] = (route, frozen)
        return frozen

    def _extra(self, route: ExtraRoute) -> Serve:
        async def serve(
            request: web.BaseRequest, params: Mapping[str, str], _qs: str, cors: dict[str, str]
        ) -> web.StreamResponse:
            try:
                if "Expect" in request.headers:
                    await send_continue(request)
                resp = await route.handler(request, params)
            except GatewayError as err:
                return error_response(err, 0, cors)
            except (ConnectionResetError, web.HTTPException):
                raise
            except Exception as exc:
                log.error("%s %s failed", route.method, route.template, exc_info=exc)
                return error_response(Internal("internal error"), 0, cors)
            if not resp.prepared:
                for key, value in cors.items():
                    resp.headers.setdefault(key, value)
            return resp

        return serve


def _shown(path: str, limit: int = 200) -> str:
    """A request path as quoted back in an error message (bounded)."""
    return path if len(path) <= limit else path[:limit] + "..."
