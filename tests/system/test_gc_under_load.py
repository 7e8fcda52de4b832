"""The garbage collector stays out of the way of calls in flight (issue 14).

With CPython's default young-generation threshold (700 container objects), the objects that 50
calls in flight hold crossed it every few milliseconds: each collection walked them all, freed
nothing and promoted them (400 collections in 8 s, 4% of the gateway's time). ``gateway serve``
raises the threshold (``gateway.__main__.GC_YOUNG_THRESHOLD``); the collections are counted in
/metrics (``python_gc_collections_total``), which this test reads around 50-way concurrent
produce over REST and over gRPC. With the default threshold it counts dozens per protocol.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import grpc
from memgw.v1 import auth_pb2, auth_pb2_grpc, produce_pb2, produce_pb2_grpc

from tests.processes import spawn_gateway

CALLS = 3000
IN_FLIGHT = 50
MAX_YOUNG_COLLECTIONS = 5  # per protocol; now REST 0, gRPC 2; the default threshold gave REST 29-41, gRPC 27


def young_collections(metrics: str) -> float:
    match = re.search(r'^python_gc_collections_total\{generation="0"\} (\S+)$', metrics, re.M)
    assert match, metrics[:2000]
    return float(match.group(1))


async def test_calls_in_flight_do_not_drive_the_collector(tmp_path: Path) -> None:
    gw = spawn_gateway(tmp_path / "data", tmp_path / "gateway.log", "--log-level", "WARNING")
    try:
        await gw.ready()
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(gw.base + "/auth/authenticate", json={"username": "root", "password": "memphis"}) as r:
                token = (await r.json())["jwt"]
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "X-Trace": "t1"}
            url = gw.base + "/stations/gc-load/produce/single"

            async def scrape() -> float:
                async with http.get(gw.base + "/metrics") as r:
                    return young_collections(await r.text())

            async def rest_calls(n: int) -> None:
                for _ in range(n):
                    async with http.post(url, data=b'{"n": 1}', headers=headers) as r:
                        assert r.status == 200, await r.text()

            await rest_calls(200)  # the station, the producer and the pools exist before counting
            before = await scrape()
            await asyncio.gather(*(rest_calls(CALLS // IN_FLIGHT) for _ in range(IN_FLIGHT)))
            rest = await scrape() - before

            async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc}") as channel:
                reply = await auth_pb2_grpc.AuthServiceStub(channel).Authenticate(
                    auth_pb2.AuthenticateRequest(username="root", password="memphis"))
                md = (("authorization", f"Bearer {reply.jwt}"),)
                stub = produce_pb2_grpc.ProduceServiceStub(channel)
                request = produce_pb2.ProduceSingleRequest(
                    station="gc-load", body={"content_type": "application/json", "data": b'{"n": 2}'},
                    headers={"x-trace": "t2"})

                async def grpc_calls(n: int) -> None:
                    for _ in range(n):
                        assert (await stub.ProduceSingle(request, metadata=md)).success

                await grpc_calls(200)
                before = await scrape()
                await asyncio.gather(*(grpc_calls(CALLS // IN_FLIGHT) for _ in range(IN_FLIGHT)))
                over_grpc = await scrape() - before
        print(f"young-generation collections for {CALLS} calls, {IN_FLIGHT} in flight: "
              f"REST {rest:.0f}, gRPC {over_grpc:.0f}")
        assert rest <= MAX_YOUNG_COLLECTIONS, f"REST: {rest:.0f} young collections for {CALLS} calls"
        assert over_grpc <= MAX_YOUNG_COLLECTIONS, f"gRPC: {over_grpc:.0f} young collections for {CALLS} calls"
    finally:
        gw.stop()
