"""The /metrics exposition: our lock-free counters render what prometheus_client's own would."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.rpc.call import Endpoint
from gateway.rpc.metrics import BUCKETS, Metrics

CALLS = [  # (method, code, seconds): on, between and beyond the bucket bounds
    ("/memgw.v1.ProduceService/ProduceSingle", "OK", 0.0004),
    ("/memgw.v1.ProduceService/ProduceSingle", "OK", 0.001),
    ("/memgw.v1.ProduceService/ProduceSingle", "OK", 0.0011),
    ("/memgw.v1.ProduceService/ProduceSingle", "UNAVAILABLE", 5.0),
    ("/memgw.v1.ConsumeService/ConsumeBatch", "OK", 0.3),
    ("/memgw.v1.ConsumeService/ConsumeBatch", "DEADLINE_EXCEEDED", 31.0),
]


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_matches_prometheus_client() -> None:
    ours = Metrics()
    reference = CollectorRegistry()
    calls = Counter("memphis_gateway_calls", "Calls by method and gRPC status code", ["method", "code"],
                    registry=reference)
    latency = Histogram("memphis_gateway_call_seconds", "Call duration by method", ["method"], buckets=BUCKETS,
                        registry=reference)
    for method, code, seconds in CALLS:
        ours.observe(cast(Endpoint, cast(Any, SimpleNamespace(full_name=method))), code, seconds)
        calls.labels(method, code).inc()
        latency.labels(method).observe(seconds)
    exposed = samples(generate_latest(ours.registry))
    got = {k: v for k, v in exposed.items() if k[0].startswith("memphis_gateway_call")}
    want = samples(generate_latest(reference))
    assert got == want
    # beside the calls: the broker gauge, and prometheus_client's process and GC collectors
    assert {k[0] for k in exposed} - set(got) >= {"memphis_gateway_broker_up", "process_cpu_seconds_total",
                                                  "process_resident_memory_bytes", "python_gc_collections_total"}
    single = (("method", "/memgw.v1.ProduceService/ProduceSingle"),)
    assert got[("memphis_gateway_call_seconds_bucket", (("le", "0.001"), *single))] == 2  # 0.001 is "le"
    assert got[("memphis_gateway_call_seconds_count", single)] == 4
    assert got[("memphis_gateway_calls_total", (("code", "OK"), *single))] == 3


def test_broker_gauge_is_exposed() -> None:
    m = Metrics()
    m.broker_up.set(1)
    assert samples(generate_latest(m.registry))[("memphis_gateway_broker_up", ())] == 1
