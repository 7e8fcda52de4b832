"""Stations destroyed or re-created behind the gateway's back (an SDK client), and the per-user
station quota."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from memgw.v1 import produce_pb2
from memphis import Memphis

from tests.conftest import connect_root
from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer, running_gateway, settings_for

TEXT = {"Content-Type": "text/plain"}


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    async with running_gateway(settings_for(nats_server.url, tmp_path_factory.mktemp("gw"))) as clients:
        yield clients


async def sdk_client(nats_server) -> Memphis:
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    return m


@pytest.mark.parametrize("remake", [True, False], ids=["remade", "destroyed"])
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
async def test_station_recreated_by_an_sdk_while_the_gateway_produces(gw: Clients, nats_server,
                                                                      protocol: str, remake: bool) -> None:
    """Re-made with 2 partitions: the gateway's produces go to both; destroyed: the gateway's next
    produce makes it again (as the Memphis server does for producers), instead of 503 until idle."""
    name = f"recreated-{protocol}-{uuid.uuid4().hex[:6]}"
    token = await gw.rest_token()

    async def produce(i: int) -> int:
        if protocol == "rest":
            status, _, _ = await gw.post(f"/stations/{name}/produce/single", raw=f"m{i}".encode(), token=token,
                                         headers=TEXT)
            return int(status)
        try:
            await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
                station=name, body={"content_type": "text/plain", "data": f"m{i}".encode()}), metadata=bearer(token))
            return 200
        except grpc.aio.AioRpcError as err:
            return 503 if err.code() == grpc.StatusCode.UNAVAILABLE else 400

    assert await produce(0) == 200  # the gateway's route into the 1-partition station
    m = await sdk_client(nats_server)
    try:
        station = await m.station(name=name)
        await station.destroy()
        if remake:
            await m.station(name=name, partitions_number=2)
        remade = time.monotonic()
        statuses: list[tuple[float, int]] = []
        for i in range(1, 200):
            statuses.append((time.monotonic() - remade, await produce(i)))
            if len(statuses) >= 10 and all(s == 200 for _, s in statuses[-10:]):
                break
            await asyncio.sleep(0.02)
    finally:
        await m.close()
    first_ok = next((t for t, s in statuses if s == 200), float("inf"))
    failed = Counter(s for _, s in statuses if s != 200)
    what = "destroyed and re-made with 2 partitions" if remake else "destroyed"
    print(f"\n{protocol}: station {what} by memphis-py: first produce ok "
          f"{first_ok:.2f} s after, failures {dict(failed)} in {statuses[-1][0]:.1f} s")
    assert first_ok < 2.0
    assert statuses[-1][1] == 200
    if not remake:
        return
    # the new route spreads over both partitions
    nc = await connect_root(nats_server)
    try:
        js = nc.jetstream()
        counts = [(await js.stream_info(f"{name}${p}")).state.messages for p in (1, 2)]
    finally:
        await nc.close()
    assert all(counts), counts

