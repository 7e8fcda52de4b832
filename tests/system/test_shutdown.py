"""Graceful stop of the real CLI process: `python -m gateway serve` with its embedded broker.

SIGTERM: stop accepting at once, let unary calls in flight finish, end streams cleanly,
close the broker connections, stop the embedded nats-server (its store intact), exit 0
within 10 s. A second SIGTERM during the drain exits at once. Run with ``-s`` for figures.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import psutil
import pytest
from memgw.v1 import consume_pb2, consume_pb2_grpc

from tests.processes import GatewayProcess, accepts, spawn_gateway

EXIT_WITHIN_S = 10.0
STARTUP_S = 30.0
LONG_POLL_MS = 3000


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    started: list[GatewayProcess] = []

    async def start(data_dir: Path, *flags: str) -> GatewayProcess:
        served = spawn_gateway(data_dir, tmp_path / f"gateway-{len(started)}.log", *flags)
        started.append(served)
        return await served.ready()

    yield start
    for served in started:  # only the processes this test started, by their handle
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


async def login(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(base + "/auth/authenticate", json={"username": "root", "password": "memphis"}) as resp:
        assert resp.status == 200
        return str((await resp.json())["jwt"])


async def test_sigterm_drains_in_flight_calls_ends_streams_and_exits_0(serve, tmp_path: Path) -> None:
    data = tmp_path / "data"
    gw = await serve(data)
    broker_pid = gw.broker_pid()
    async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc}") as channel:
        token = await login(http, gw.base)
        auth = {"Authorization": f"Bearer {token}"}
        async with http.post(gw.base + "/stations/kept/produce/single", data=b"keep-me",
                             headers={**auth, "Content-Type": "text/plain"}) as resp:
            assert resp.status == 200
        stub = consume_pb2_grpc.ConsumeServiceStub(channel)
        md = (("authorization", f"Bearer {token}"),)

        async def long_poll_rest() -> tuple[int, object, float]:
            async with http.post(gw.base + "/stations/empty/consume/batch", headers=auth, json={
                    "consumer_name": "slow", "batch_size": 10, "batch_max_wait_time_ms": LONG_POLL_MS}) as resp:
                return resp.status, await resp.json(), time.monotonic()

        async def long_poll_grpc() -> tuple[str, int, float]:
            reply = await stub.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
                station="empty", consumer_name="slow-grpc", batch_size=10, batch_max_wait_time_ms=LONG_POLL_MS),
                metadata=md, timeout=15)
            return "OK", len(reply.messages), time.monotonic()

        async def stream_rest() -> tuple[int, int, float]:
            lines = 0
            async with http.post(gw.base + "/stations/kept/consume/stream", headers=auth,
                                 json={"consumer_name": "streamer", "consumer_group": "ndjson"}) as resp:
                async for _line in resp.content:
                    lines += 1
                return resp.status, lines, time.monotonic()

        async def stream_grpc() -> tuple[str, int, float]:
            request = consume_pb2.SubscribeRequest(station="kept", consumer_name="sub", consumer_group="sub")
            call = stub.Subscribe(request, metadata=md, timeout=15)
            batches = 0
            async for _batch in call:
                batches += 1
            return (await call.code()).name, batches, time.monotonic()

        tasks = [asyncio.create_task(c()) for c in (long_poll_rest, long_poll_grpc, stream_rest, stream_grpc)]
        await asyncio.sleep(0.7)  # every call is in its handler
        assert not any(t.done() for t in tasks)
        t_term = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)

        refused: dict[str, float] = {}
        while len(refused) < 2 and time.monotonic() - t_term < 3:
            for name, port in (("http", gw.http), ("grpc", gw.grpc)):
                if name not in refused and not accepts(port):
                    refused[name] = time.monotonic() - t_term
            await asyncio.sleep(0.02)
        (rest_status, rest_body, rest_done), (grpc_code, _, grpc_done), (stream_status, lines, stream_done), \
            (sub_code, batches, sub_done) = await asyncio.wait_for(asyncio.gather(*tasks), EXIT_WITHIN_S)
        code = await gw.exit_code(EXIT_WITHIN_S)
        t_exit = time.monotonic() - t_term

    print(f"\nFIGURES graceful stop: new connections refused after http {refused.get('http', -1):.3f} s, "
          f"grpc {refused.get('grpc', -1):.3f} s; in-flight {LONG_POLL_MS} ms long polls answered "
          f"{rest_done - t_term:.2f} s (REST {rest_status}) / {grpc_done - t_term:.2f} s (gRPC {grpc_code}) after "
          f"SIGTERM; streams ended after {stream_done - t_term:.2f} s (REST NDJSON, {lines} lines) / "
          f"{sub_done - t_term:.2f} s (gRPC {sub_code}, {batches} batches); exit {code} after {t_exit:.2f} s")
    assert code == 0, gw.log_text()
    assert t_exit < EXIT_WITHIN_S
    assert set(refused) == {"http", "grpc"} and max(refused.values()) < 1.0, refused
    # Both long polls (one consumer group: fetches take turns) answer by their own deadline.
    assert (rest_status, rest_body) == (200, []) and rest_done - t_term < LONG_POLL_MS / 1000
    assert grpc_code == "OK" and grpc_done - t_term < LONG_POLL_MS / 1000
    assert stream_status == 200 and lines == 1 and stream_done - t_term < 2.5  # the kept message, then a clean end
    assert sub_code == "OK" and batches == 1 and sub_done - t_term < 2.5
    assert not psutil.pid_exists(broker_pid), "the embedded nats-server outlived the gateway"
    assert "stopped (drain" in gw.log_text()

    # The store is intact: a new gateway on the same data directory still has the message.
    again = await serve(data)
    async with aiohttp.ClientSession() as http:
        token = await login(http, again.base)
        async with http.post(again.base + "/stations/kept/consume/batch", headers={"Authorization": f"Bearer {token}"},
                             json={"consumer_name": "after", "consumer_group": "after", "batch_size": 10,
                                   "batch_max_wait_time_ms": 1000}) as resp:
            assert resp.status == 200
            assert [m["message"] for m in await resp.json()] == ["keep-me"]
    again.proc.send_signal(signal.SIGTERM)
    assert await again.exit_code(EXIT_WITHIN_S) == 0


async def test_second_sigterm_exits_at_once(serve, tmp_path: Path) -> None:
    gw = await serve(tmp_path / "data")
    broker_pid = gw.broker_pid()
    async with aiohttp.ClientSession() as http:
        token = await login(http, gw.base)
        poll = asyncio.create_task(http.post(
            gw.base + "/stations/empty/consume/batch", headers={"Authorization": f"Bearer {token}"},
            json={"consumer_name": "slow", "batch_size": 10, "batch_max_wait_time_ms": 8000}))
        await asyncio.sleep(0.5)
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert gw.proc.poll() is None  # still draining the 8 s long poll
        t_second = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = await gw.exit_code(EXIT_WITHIN_S)
        took = time.monotonic() - t_second
        with pytest.raises(aiohttp.ClientError):
            resp = await poll
            await resp.read()
    print(f"\nFIGURES second SIGTERM: exit {code} after {took * 1000:.0f} ms")
    assert code == 128 + signal.SIGTERM
    assert took < 1.0
    assert not psutil.pid_exists(broker_pid)
    assert "exiting at once" in gw.log_text()



async def test_drain_is_bounded_by_the_drain_timeout(serve, tmp_path: Path) -> None:
    """A call longer than the drain timeout is cut: the process still exits 0, on time."""
    gw = await serve(tmp_path / "data", "--drain-timeout-s", "1.5")
    async with aiohttp.ClientSession() as http:
        token = await login(http, gw.base)
        poll = asyncio.create_task(http.post(
            gw.base + "/stations/empty/consume/batch", headers={"Authorization": f"Bearer {token}"},
            json={"consumer_name": "slow", "batch_size": 10, "batch_max_wait_time_ms": 20000}))
        await asyncio.sleep(0.5)
        t_term = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = await gw.exit_code(EXIT_WITHIN_S)
        took = time.monotonic() - t_term
        with pytest.raises(aiohttp.ClientError):  # cut: the connection closes without an answer
            resp = await poll
            await resp.read()
    print(f"\nFIGURES drain timeout 1.5 s, a 20 s long poll in flight: exit {code} after {took:.2f} s")
    assert code == 0
    assert 1.4 < took < 1.5 + 2.0
