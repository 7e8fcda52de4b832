"""The gRPC handlers' use of grpc's call context, with a fake context that knows when grpc
has released the call (after which grpc's ``context.peer()`` reads freed memory)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
from memgw.v1 import consume_pb2, produce_pb2

from gateway.rpc.call import Endpoint, build_endpoints
from gateway.rpc.contract import SERVICES
from gateway.rpc.grpc_server import _handler
from tests.unit.test_rest_transcoder import TOKEN, Calls, FakeAuth, FakeConsume, FakeMonitoring, FakeProduce, TokenGuard

PEER = "ipv4:127.0.0.1:50000"


class FakeContext:
    """Records whether each ``peer()`` came while the call was live."""

    def __init__(self) -> None:
        self.released = False
        self.peer_asked: list[bool] = []  # True: asked after the release

    def peer(self) -> str:
        self.peer_asked.append(self.released)
        return PEER

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {TOKEN}"),)

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None


def faked(servicers: list[Any]) -> list[Any]:
    """The contract's services that have a fake here (the management services have their own tests)."""
    names = {s.SERVICE for s in servicers}
    return [s for s in SERVICES if s.full_name in names]


def endpoint(name: str) -> Endpoint:
    calls = Calls(failures=False)
    servicers = [FakeProduce(calls), FakeConsume(calls), FakeAuth(calls), FakeMonitoring(calls)]
    return next(e for e in build_endpoints(faked(servicers), servicers, TokenGuard()) if e.full_name.endswith(name))


def access_lines(caplog: pytest.LogCaptureFixture, method: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.access" and f"/{method} " in r.getMessage()]


async def test_a_stream_grpc_stopped_iterating_logs_its_peer_without_asking_a_released_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """grpc leaves a response generator it stopped iterating (the client went away mid-write) to
    the garbage collector, which finalizes it after grpc released the call."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    context = FakeContext()
    responses: Any = _handler(endpoint("Subscribe")).unary_stream(consume_pb2.SubscribeRequest(), context)
    assert (await anext(responses)).messages[0].message == b"m0"
    context.released = True  # grpc is done with the call ...
    del responses  # ... and drops the generator without closing it
    for _ in range(10):  # the loop's finalizer closes it (the response generator, then the endpoint's)
        gc.collect()
        await asyncio.sleep(0.01)
    [line] = access_lines(caplog, "Subscribe")
    assert f"peer={PEER}" in line
    assert context.peer_asked and not any(context.peer_asked)


async def test_a_unary_call_asks_for_its_peer_only_to_log(caplog: pytest.LogCaptureFixture) -> None:
    context = FakeContext()
    handler = _handler(endpoint("ProduceSingle")).unary_unary
    request = produce_pb2.ProduceSingleRequest(station="s", body={"content_type": "text/plain", "data": b"x"})
    caplog.set_level(logging.WARNING, logger="gateway.access")
    assert (await handler(request, context)).success
    assert context.peer_asked == []  # no log line, no peer() (it costs more than the rest of the context)
    caplog.set_level(logging.INFO, logger="gateway.access")
    assert (await handler(request, context)).success
    assert context.peer_asked == [False]
    [line] = access_lines(caplog, "ProduceSingle")
    assert f"peer={PEER}" in line
