"""gRPC health (grpc.health.v1) and server reflection, as grpcurl and health probes use them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.harness import Clients, running_gateway, settings_for


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> Clients:
    async with running_gateway(settings_for(nats_server.url, tmp_path_factory.mktemp("gw"))) as clients:
        yield clients


async def test_health_serving(gw: Clients) -> None:
    stub = health_pb2_grpc.HealthStub(gw.channel)
    for service in ("", "memgw.v1.ProduceService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(gw: Clients) -> None:
    assert gw.gateway.ports is not None
    address = f"127.0.0.1:{gw.gateway.ports.grpc}"

    def look_up() -> tuple[set[str], str]:  # the reflection client is synchronous: off the event loop
        with grpc.insecure_channel(address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            return set(db.get_services()), db.FindFileContainingSymbol("memgw.v1.ProduceService").name

    services, file_name = await asyncio.to_thread(look_up)
    assert {"memgw.v1.AuthService", "memgw.v1.ProduceService", "memgw.v1.ConsumeService",
            "memgw.v1.MonitoringService", "grpc.health.v1.Health"} <= services
    assert file_name == "memgw/v1/produce.proto"
