"""Prometheus metrics: one observation per call, both protocols, served at GET /metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.calls import Endpoint
from gateway.rest import ExtraRoute

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """An ``Observer`` for ``Endpoint`` calls, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "memphis_gateway_calls", "Calls by method and gRPC status code", ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "memphis_gateway_call_seconds", "Call duration by method", ["method"], buckets=BUCKETS,
            registry=self.registry,
        )
        self.broker_up = Gauge("memphis_gateway_broker_up", "1 while the broker answers", registry=self.registry)
        self._children: dict[tuple[str, str], Any] = {}

    def observe(self, endpoint: Endpoint, code: str, seconds: float) -> None:
        key = (endpoint.full_name, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                self.calls.labels(endpoint.full_name, code),
                self.latency.labels(endpoint.full_name),
            )
        child[0].inc()
        child[1].observe(seconds)

    def route(self) -> ExtraRoute:
        async def handler(request: web.Request, params: Mapping[str, str]) -> web.StreamResponse:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return ExtraRoute(method="GET", template="/metrics", handler=handler)
