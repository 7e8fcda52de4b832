"""Issue 10, item 8: no limits on gRPC streams.

One tokenless HTTP/2 connection held 20,000 header-only streams (+317 MB). The streams of one
connection must be bounded, and so must the time a stream may stay open without a token (or, for
the public Authenticate, without its request message).

Streams are opened with raw HTTP/2 frames (``h2raw``): HEADERS without END_STREAM, never a message.
The gateway runs with ``--request-timeout-s 10``.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.system.security.conftest import GatewayProcess, RssWatch, figure
from tests.system.security.h2raw import RawH2

REQUEST_TIMEOUT_S = 10
GATEWAY_ARGS = ["--request-timeout-s", str(REQUEST_TIMEOUT_S)]
STREAMS = 10_000
MAX_STREAMS_PER_CONNECTION = 1000  # generous: gRPC servers commonly advertise 100


PATHS = ["/memgw.v1.ConsumeService/Subscribe", "/memgw.v1.ProduceService/ProduceSingle",
         "/memgw.v1.AuthService/Authenticate"]


@pytest.mark.fresh_gateway
@pytest.mark.timeout(90)
async def test_header_only_streams_on_one_connection_are_bounded(gw: GatewayProcess) -> None:
    """One connection per path (a streaming, a unary and the public RPC), attacked together."""
    conns = {path.rsplit("/", 1)[1]: RawH2("127.0.0.1", gw.grpc_port) for path in PATHS}
    with RssWatch(gw) as watch:
        for conn in conns.values():
            await conn.connect()
        sent = await asyncio.gather(*(c.open_streams(STREAMS, p) for c, p in zip(conns.values(), PATHS, strict=True)))
        await asyncio.sleep(3)
        held_3s = {m: c.held() for m, c in conns.items()}
        growth_3s = watch.growth_mb
        await asyncio.sleep(REQUEST_TIMEOUT_S + 5 - 3)
        held_late = {m: c.held() for m, c in conns.items()}
    advertised = {m: c.stats.max_concurrent_streams for m, c in conns.items()}
    for conn in conns.values():
        await conn.close()
    figure("grpc-streams", f"{STREAMS} tokenless header-only streams on each of 3 connections (sent {sent}): "
           f"held at 3 s {held_3s}, at {REQUEST_TIMEOUT_S + 5} s {held_late}; advertised max {advertised}; "
           f"{watch.describe()} (+{growth_3s:.0f} MB at 3 s)",
           held_3s=held_3s, held_late=held_late, rss_mb=watch.growth_mb, advertised=advertised)
    assert all(n <= MAX_STREAMS_PER_CONNECTION for n in held_3s.values()), held_3s
    # Known gap: grpc-python calls a unary handler only once the request message is in, so a stream
    # that never sends one is held until the connection's age limit (--grpc-max-connection-age-s, 1 h),
    # not the request timeout; what it can hold is bounded (the advertised max per connection).
    assert all(n <= advertised[m] for m, n in held_late.items()), (held_late, advertised)
    assert watch.growth_mb < 50
