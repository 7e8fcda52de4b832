"""gRPC health (grpc.health.v1) and server reflection, as grpcurl and health probes use them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.harness import Clients


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


@pytest.mark.parametrize("method", ["/memgw.v1.ProduceService/ProduceNothing", "/memgw.v1.NoService/ProduceSingle",
                                    "/grpc.health.v1.Health/Nope", "ProduceSingle"])
async def test_an_unknown_method_is_unimplemented(gw: Clients, method: str) -> None:
    call = gw.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_every_endpoint_and_health_answer_by_full_path(gw: Clients) -> None:
    """Each endpoint is found by its full path (an empty request is refused for what it is, never UNIMPLEMENTED)."""
    for endpoint in gw.gateway.endpoints:
        if endpoint.client_streaming or endpoint.server_streaming:
            continue
        call = gw.channel.unary_unary(endpoint.full_name, request_serializer=None, response_deserializer=None)
        try:
            await call(b"", timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() != grpc.StatusCode.UNIMPLEMENTED, endpoint.full_name
    reply = await health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
