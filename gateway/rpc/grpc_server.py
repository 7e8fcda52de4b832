"""The gRPC server: generic handlers built from the same Endpoints REST uses.

Also serves grpc.health.v1 (SERVING while the broker answers) and server
reflection, so grpcurl and grpc-health-probe work without the protos.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_status import rpc_status

from gateway.core.errors import GatewayError, Unauthenticated
from gateway.rpc.call import CallContext, Endpoint


def _context(context: grpc.aio.ServicerContext[Any, Any], *, peer_now: bool = False) -> CallContext:
    """The call's context. Its peer is asked for only when a log line needs it (``context.peer()``
    costs more than the rest of this), which is safe while the handler runs. A streaming answer's
    generator may run its ``finally`` (and log) after grpc released the call: grpc leaves a
    generator it stopped iterating to the garbage collector, and ``peer()`` on a released call
    reads freed memory. So streams ask at once (``peer_now``)."""
    remaining = context.time_remaining()
    if peer_now:
        peer = context.peer()
        peer_of: Callable[[], str | None] = lambda: peer  # noqa: E731
    else:
        peer_of = context.peer
    return CallContext(
        protocol="grpc",
        # gRPC metadata keys are lower-case on the wire (grpc core refuses others); -bin values are bytes
        metadata={k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)},
        peer_of=peer_of,
        deadline=None if remaining is None else time.monotonic() + remaining,
    )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: GatewayError) -> None:
    message = f"{error.message}: {error.why}" if isinstance(error, Unauthenticated) else error.message
    status = status_pb2.Status(code=error.code.value[0], message=message)
    if error.detail is not None:
        detail = any_pb2.Any()
        detail.Pack(error.detail)
        status.details.append(detail)
    if error.retry_after is not None:
        await context.send_initial_metadata((("retry-after", str(int(error.retry_after + 0.999))),))
    await context.abort_with_status(rpc_status.to_status(status))


async def _send_headers(context: grpc.aio.ServicerContext[Any, Any], headers: dict[str, str]) -> None:
    await context.send_initial_metadata(tuple((k.lower(), v) for k, v in headers.items()))


def _handler(endpoint: Endpoint) -> grpc.RpcMethodHandler:
    deserialize = endpoint.request_type.FromString
    serialize = endpoint.response_type.SerializeToString
    sized = not endpoint.client_streaming and endpoint.guard.meters_bytes  # the Guard's bytes/s limit wants sizes

    if endpoint.server_streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            ctx = _context(context, peer_now=True)
            try:
                async for response in endpoint.server_stream(request, ctx):
                    yield response
            except GatewayError as error:
                await _abort(context, error)

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=deserialize, response_serializer=serialize
        )

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        ctx = _context(context)
        if sized:
            ctx.request_bytes = request.ByteSize()
        try:
            response = await endpoint.unary(request, ctx)
        except GatewayError as error:
            await _abort(context, error)
        if ctx.response_headers:
            await _send_headers(context, ctx.response_headers)
        return response

    make = grpc.stream_unary_rpc_method_handler if endpoint.client_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary, request_deserializer=deserialize, response_serializer=serialize)


def build_grpc_server(
    endpoints: Iterable[Endpoint],
    health_servicer: health.aio.HealthServicer | None = None,
    *,
    max_message_bytes: int,
    idle_s: float = 300.0,
    reuse_port: bool = False,
    max_streams: int = 100,
    max_age_s: float = 3600.0,
) -> grpc.aio.Server:
    """The server; ``max_streams`` bounds the concurrent calls (HTTP/2 streams) of one connection:
    beyond it, grpc core refuses new streams (REFUSED_STREAM) instead of holding each one, which
    is what let one connection hold 20,000 header-only streams. Connections live at most
    ``max_age_s`` (then get a GOAWAY and ``max_age_s / 10``, at most 60 s, to finish their calls)
    and close after ``idle_s`` without calls."""
    endpoints = list(endpoints)
    options = [
        ("grpc.max_concurrent_streams", max_streams),
        ("grpc.max_connection_age_ms", int(max_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(min(max_age_s / 10, 60.0) * 1000)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),  # --workers share the port; else a clash is an error
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_idle_ms", int(idle_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    server = grpc.aio.server(options=options)
    # One generic handler for every method: one dict lookup finds a call's handler. Not registered
    # methods: grpc.aio's accept loop keeps one pending request per registered method and runs
    # asyncio.wait() over all of them for every incoming call, so each one would cost every call.
    server.add_generic_rpc_handlers([_Methods({endpoint.full_name: _handler(endpoint) for endpoint in endpoints})])
    services = list(dict.fromkeys(endpoint.service.full_name for endpoint in endpoints))
    names = [*services, reflection.SERVICE_NAME]
    generic_only = _GenericOnly(server)
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generic_only)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), generic_only)
    return server


class _Methods(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Method handlers by full path ("/package.Service/Method")."""

    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


class _GenericOnly:
    """A server as grpcio's generated ``add_*Servicer_to_server`` sees it: their generic
    handler is added, their method registration dropped (see ``build_grpc_server``)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(handlers))

    def add_registered_method_handlers(self, _service: str, _handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass
