"""The protocol-neutral call: what gRPC and REST both invoke.

Each RPC of the protos becomes one :class:`Endpoint`, built from the service
descriptors at start-up and bound to the servicer method of the same name. The
gRPC server and the REST transcoder only translate their protocol into a
:class:`CallContext` and a request message, then call ``Endpoint.unary`` (unary
calls, and client streams with an async iterator of requests) or
``Endpoint.server_stream``. Authentication, limits,
metrics, the access log and error mapping happen here, once for both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from memgw.v1 import options_pb2

from gateway import logs
from gateway.core.deadlines import deadlines
from gateway.core.errors import DeadlineExceeded, GatewayError, Internal
from gateway.core.identity import Principal

access_log = logging.getLogger("gateway.access")
log = logging.getLogger("gateway.calls")
_request_ids = itertools.count(1)


@dataclass(slots=True, kw_only=True)
class CallContext:
    """One call, whatever the protocol."""

    protocol: str  # "grpc" or "rest"
    metadata: Mapping[str, str]  # lower-case keys
    # who calls, asked only when a log line needs it (a gRPC peer() costs more than the rest of a call's context)
    peer_of: Callable[[], str | None] | None = field(default=None, repr=False)
    deadline: float | None = None  # time.monotonic() based
    principal: Principal | None = None
    request_bytes: int = 0  # size of the request body / message, for byte-rate limits
    request_id: int = field(default_factory=_request_ids.__next__)
    # Response metadata the servicer wants sent (gRPC initial metadata / HTTP headers).
    response_headers: dict[str, str] = field(default_factory=dict)
    expired: bool = False  # the deadline passed and the call was cancelled for it
    # the caller's rights, set at admission: (action, station) -> None or PermissionDenied
    authorizer: Callable[[str, str], None] | None = field(default=None, repr=False)
    admitted: bool = False  # Endpoint.admit ran ahead of the call (REST: before reading the body)
    _peer: str | None = field(default=None, repr=False)

    @property
    def peer(self) -> str:
        """The caller's address ("" if unknown)."""
        if self._peer is None:
            self._peer = (self.peer_of() if self.peer_of is not None else None) or ""
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def authorize(self, action: str, station: str) -> None:
        """PermissionDenied unless the caller may ``action`` ("produce", "consume") on ``station``.

        Admission already checked the station of a request that names one; a call that
        touches several (a produce stream's frames) checks each with this."""
        if self.authorizer is None:
            raise Internal("no authorization on an authenticated method")
        self.authorizer(action, station)

    def require_principal(self) -> Principal:
        if self.principal is None:  # only public methods run without one
            raise Internal("no principal on an authenticated method")
        return self.principal


class Guard(Protocol):
    """Cross-cutting admission: authentication and limits, then authorization, for both protocols.

    ``admit`` (who calls, within their limits) may run before the request exists (REST admits
    before it reads a body); ``authorize`` (may they do this to the request's station) runs once the
    request is built. Both are synchronous: a (cached) token, a token bucket and a pattern match
    never wait for anything."""

    def admit(self, endpoint: Endpoint, ctx: CallContext) -> None: ...

    def authorize(self, endpoint: Endpoint, ctx: CallContext, request: Any) -> None: ...

    @property
    def meters_bytes(self) -> bool: ...

    def charge(self, ctx: CallContext, nbytes: int) -> None: ...

    def release(self, endpoint: Endpoint, ctx: CallContext) -> None: ...


class Observer(Protocol):
    """Metrics sink called once per finished call."""

    def observe(self, endpoint: Endpoint, code: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    service: ServiceDescriptor
    method: MethodDescriptor
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[..., Any]
    guard: Guard
    observer: Observer | None = None
    public: bool = False  # (memgw.v1.access).public: callable without a token
    action: str = ""  # (memgw.v1.access).action: "produce", "consume", "manage" or "" (any caller)
    station_field: str = ""  # (memgw.v1.access).station_field: the request field naming the station
    full_name: str = ""  # "/pkg.Service/Method"
    # from the method descriptor, read once (every call asks)
    client_streaming: bool = field(init=False)
    server_streaming: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_streaming", bool(self.method.client_streaming))
        object.__setattr__(self, "server_streaming", bool(self.method.server_streaming))


    def admit(self, ctx: CallContext) -> float:
        """Admission ahead of the call; ``unary`` and ``server_stream`` then skip it.

        REST admits before it reads a body, so a caller without a valid token (or over its
        limits) is refused before it can make the gateway hold its bytes. A refusal is logged
        and counted here. Returns the time the call started, for :meth:`abandon`."""
        started = time.monotonic()
        try:
            self.guard.admit(self, ctx)
        except BaseException as exc:
            self._finish(ctx, _code_of(exc), started)
            raise
        ctx.admitted = True
        return started

    def abandon(self, ctx: CallContext, exc: BaseException, started: float) -> None:
        """An admitted call that never reached ``unary``/``server_stream`` (its body could not be read)."""
        self._finish(ctx, _code_of(exc), started)

    def charge(self, ctx: CallContext, nbytes: int) -> None:
        """Charge bytes learnt after admission (a chunked body) to the caller's bytes/s limit."""
        if self.guard.meters_bytes:
            self.guard.charge(ctx, nbytes)

    async def unary(self, request: Any, ctx: CallContext) -> Message:
        """Unary and client-streaming calls (request is an async iterator for the latter).

        Every call runs through here, so it is one coroutine frame: admission, the deadline,
        the handler, then metrics, the access log and error mapping in ``_finish``."""
        started = time.monotonic()
        code = "OK"
        try:
            if not ctx.admitted:
                self.guard.admit(self, ctx)
            self.guard.authorize(self, ctx, request)
            if self.client_streaming and self.guard.meters_bytes:
                request = self._metered(request, ctx)
            if ctx.deadline is None:
                return await self.handler(request, ctx)
            timers = deadlines()
            task = asyncio.current_task(timers.loop())
            timer = timers.at(ctx.deadline, _expire, (ctx, task))
            try:
                return await self.handler(request, ctx)
            except asyncio.CancelledError:
                if ctx.expired and task is not None and task.uncancel() == 0:
                    raise TimeoutError from None
                raise
            finally:
                timers.cancel(timer)
        except BaseException as exc:
            code = _code_of(exc)
            if isinstance(exc, _PASSED_ON):
                raise
            # no local names the new exception: its traceback holds this frame (no cycle per failed call)
            raise _as_gateway_error(exc, self, ctx) from exc
        finally:
            self._finish(ctx, code, started)

    async def _metered(self, frames: AsyncIterator[Message], ctx: CallContext) -> AsyncIterator[Message]:
        """A client stream whose frames are charged to the caller's bytes/s limit as they arrive."""
        async for frame in frames:
            self.guard.charge(ctx, frame.ByteSize())
            yield frame

    async def server_stream(self, request: Message, ctx: CallContext) -> AsyncIterator[Message]:
        started = time.monotonic()
        code = "OK"
        try:
            if not ctx.admitted:
                self.guard.admit(self, ctx)
            self.guard.authorize(self, ctx, request)
            async for response in self.handler(request, ctx):
                yield response
        except BaseException as exc:
            code = _code_of(exc)
            if isinstance(exc, _PASSED_ON):
                raise
            # no local names the new exception: its traceback holds this frame (no cycle per failed call)
            raise _as_gateway_error(exc, self, ctx) from exc
        finally:
            self._finish(ctx, code, started)

    def _finish(self, ctx: CallContext, code: str, started: float) -> None:
        elapsed = time.monotonic() - started
        self.guard.release(self, ctx)
        if self.observer is not None:
            self.observer.observe(self, code, elapsed)
        if access_log.isEnabledFor(logging.INFO):
            user = ctx.principal.username if ctx.principal else "-"
            logs.access(ctx.protocol, self.full_name, code, user, ctx.peer, elapsed, ctx.request_id)


def _expire(call: tuple[CallContext, asyncio.Task[Any] | None]) -> None:
    """A call's deadline passed: cancel its task (``unary`` turns that into TimeoutError)."""
    ctx, task = call
    ctx.expired = True
    if task is not None:
        task.cancel()


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return str(exc.code.name)
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "INTERNAL"


# raised as they are; any other exception becomes a GatewayError (_as_gateway_error)
_PASSED_ON = (GatewayError, asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit)


def _as_gateway_error(exc: BaseException, endpoint: Endpoint, ctx: CallContext) -> GatewayError:
    """What an exception that is not ``_PASSED_ON`` is to the caller (an unexpected one is logged)."""
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded("deadline exceeded")
    log.error("unexpected error in %s (request id %d)", endpoint.full_name, ctx.request_id, exc_info=exc)
    return Internal(f"internal error (request id {ctx.request_id})")


_ACTIONS = {
    options_pb2.ACTION_UNSPECIFIED: "",
    options_pb2.ACTION_PRODUCE: "produce",
    options_pb2.ACTION_CONSUME: "consume",
    options_pb2.ACTION_MANAGE: "manage",
}


def _station_field(method: MethodDescriptor, name: str) -> str:
    if name and (name not in method.input_type.fields_by_name or method.client_streaming):
        raise LookupError(f"{method.full_name}: station_field {name!r} is no field of a unary request")
    return name


def build_endpoints(
    services: Iterable[ServiceDescriptor],
    servicers: Iterable[object],
    guard: Guard,
    observer: Observer | None = None,
) -> list[Endpoint]:
    """Bind every RPC of ``services`` to the servicer whose ``SERVICE`` names it."""
    by_name = {s.SERVICE: s for s in servicers}  # type: ignore[attr-defined]
    endpoints = []
    for service in services:
        servicer = by_name.get(service.full_name)
        if servicer is None:
            raise LookupError(f"no servicer for {service.full_name}")
        for method in service.methods:
            handler = getattr(servicer, method.name, None)
            if handler is None:
                raise LookupError(f"{type(servicer).__name__} lacks {method.name}")
            access = method.GetOptions().Extensions[options_pb2.access]
            endpoints.append(
                Endpoint(
                    public=access.public,
                    action=_ACTIONS[access.action],
                    station_field=_station_field(method, access.station_field),
                    full_name=f"/{service.full_name}/{method.name}",
                    service=service,
                    method=method,
                    request_type=GetMessageClass(method.input_type),
                    response_type=GetMessageClass(method.output_type),
                    handler=handler,
                    guard=guard,
                    observer=observer,
                )
            )
    return endpoints
