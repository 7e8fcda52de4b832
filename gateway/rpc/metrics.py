"""Prometheus metrics: one observation per call, both protocols, served at GET /metrics.

Every call is observed, so the hot path is a dict lookup, a bisect and three list
increments (no lock: everything runs on the event loop). prometheus_client renders the
text format at scrape time from a collector reading those lists.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, GCCollector, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.rpc.call import Endpoint

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# bucket labels as prometheus_client writes them
_LE = (*(floatToGoString(b) for b in BUCKETS), "+Inf")  # type: ignore[no-untyped-call]
Snapshot = dict[str, Any]


class _Latency:
    """One method's histogram: per-bucket counts (not cumulative) plus +Inf, and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


class _CallCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        calls_by_key, latency_by_method = self._metrics.merged()
        calls = CounterMetricFamily("memphis_gateway_calls", "Calls by method and gRPC status code",
                                    labels=["method", "code"])
        for (method, code), count in sorted(calls_by_key.items()):
            calls.add_metric([method, code], count)
        yield calls
        latency = HistogramMetricFamily("memphis_gateway_call_seconds", "Call duration by method",
                                        labels=["method"])
        for method, h in sorted(latency_by_method.items()):
            cumulative, running = [], 0
            for bound, count in zip(_LE, h.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric([method], cumulative, h.total)
        yield latency


class Metrics:
    """An ``Observer`` for ``Endpoint`` calls, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls: dict[tuple[str, str], int] = {}  # (method, code) -> calls
        self.latency: dict[str, _Latency] = {}  # method -> histogram
        self._others: Sequence[Snapshot] = ()  # other workers' snapshots, during one exposition
        self.registry.register(_CallCollector(self))
        # the process answering the scrape (with --workers: one worker's): CPU, memory, GC collections
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.broker_up = Gauge("memphis_gateway_broker_up", "1 while the broker answers", registry=self.registry)

    def observe(self, endpoint: Endpoint, code: str, seconds: float) -> None:
        method = endpoint.full_name
        key = (method, code)
        self.calls[key] = self.calls.get(key, 0) + 1
        h = self.latency.get(method)
        if h is None:
            h = self.latency[method] = _Latency()
        h.counts[bisect_left(BUCKETS, seconds)] += 1  # le: a value equal to a bound falls in its bucket
        h.total += seconds

    def snapshot(self) -> Snapshot:
        """This process's calls and latencies as plain JSON values (for the other workers' scrapes)."""
        return {
            "calls": [[method, code, n] for (method, code), n in self.calls.items()],
            "latency": {method: [*h.counts, h.total] for method, h in self.latency.items()},
        }

    def merged(self) -> tuple[dict[tuple[str, str], int], dict[str, _Latency]]:
        """This process's figures plus those of ``exposition(others=...)``."""
        if not self._others:
            return self.calls, self.latency
        calls = dict(self.calls)
        latency: dict[str, _Latency] = {}
        for method, h in self.latency.items():
            latency[method] = copy = _Latency()
            copy.counts, copy.total = list(h.counts), h.total
        for other in self._others:
            for method, code, n in other.get("calls", ()):
                calls[(method, code)] = calls.get((method, code), 0) + int(n)
            for method, values in other.get("latency", {}).items():
                if len(values) != len(BUCKETS) + 2:
                    continue
                h = latency.get(method) or latency.setdefault(method, _Latency())
                h.counts = [a + int(b) for a, b in zip(h.counts, values[:-1], strict=True)]
                h.total += float(values[-1])
        return calls, latency

    def exposition(self, others: Sequence[Snapshot] = ()) -> tuple[bytes, str]:
        """The Prometheus text format of every metric (summed with ``others``: other workers'
        snapshots), and its content type."""
        self._others = others
        try:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        finally:
            self._others = ()
