"""Slow and stuck HTTP clients, against the real CLI process (its memory is measured with psutil).

A client that asks for a big consume batch (2000 messages of 10 KB) or a stream and then stops
reading must not hold the gateway's memory: the response waits in asyncio's write buffer until
the connection makes no progress for --http-send-timeout-s, then the connection is aborted and
the buffer freed. Idle connections close after --http-keepalive-s. Other clients are served all
along. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.processes import GatewayProcess as Gateway
from tests.processes import spawn_gateway

SEND_TIMEOUT_S = 3.0  # --http-send-timeout-s in the process under test (30 s by default)
KEEPALIVE_S = 2.0  # --http-keepalive-s (15 s by default)
MESSAGES, MESSAGE_BYTES = 2000, 10_000
STUCK_CLIENTS = 3
MB = 1024 * 1024

CUT_SLACK_S = 8.0  # the check runs every second; a loaded CI machine adds seconds more
TIMEOUT_FLAGS = ["--http-send-timeout-s", str(SEND_TIMEOUT_S), "--http-keepalive-s", str(KEEPALIVE_S)]


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("slow")
    gw = spawn_gateway(tmp / "data", tmp / "gateway.log", *TIMEOUT_FLAGS, "--log-level", "WARNING")
    try:
        yield await gw.ready()
    finally:
        await asyncio.to_thread(gw.stop)


@pytest.fixture(scope="module")
async def token(gateway: Gateway) -> str:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.base + "/auth/authenticate", json={"username": "root", "password": "memphis"}) as resp:
        return str((await resp.json())["jwt"])


async def fill(gateway: Gateway, token: str, station: str) -> None:
    body = [f"{i:06d}" + "x" * (MESSAGE_BYTES - 6) for i in range(100)]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(MESSAGES // 100):
            async with http.post(f"{gateway.base}/stations/{station}/produce/batch", json=body) as resp:
                assert resp.status == 200, await resp.text()


def stuck_client(gateway: Gateway, token: str, path: str, body: bytes) -> socket.socket:
    """A client that sends its request and then never reads (a tiny receive buffer, no recv)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.http))
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


class RssSampler:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway, self.peak, self._task = gateway, gateway.rss(), None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.gateway.rss())
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def served_meanwhile(gateway: Gateway, token: str) -> float:
    """Another client's status check and produce, answered while the stuck ones hold their buffers."""
    started = time.monotonic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.get(gateway.base + "/monitoring/status") as resp:
            assert resp.status == 200
        async with http.post(gateway.base + "/stations/other/produce/single", data=b"hi",
                             headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 200
    return time.monotonic() - started


async def wait_closed(gateway: Gateway, ports: set[int], within: float) -> float:
    started = time.monotonic()
    while gateway.open_from(ports):
        assert time.monotonic() - started < within, "the gateway kept the stuck connections"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_stuck_readers_of_big_batches_do_not_hold_memory(gateway: Gateway, token: str) -> None:
    await fill(gateway, token, "big")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:  # a reading client
        async with http.post(gateway.base + "/stations/big/consume/batch", json={
                "consumer_name": "warm", "consumer_group": "warm", "batch_size": MESSAGES,
                "batch_max_wait_time_ms": 3000}) as resp:
            assert resp.status == 200 and len(await resp.json()) == MESSAGES
            response_mb = resp.content_length / MB if resp.content_length else 0.0
    baseline = gateway.rss()
    rounds = []
    for r in range(2):
        with RssSampler(gateway) as rss:
            socks = [stuck_client(gateway, token, "/stations/big/consume/batch",
                                  b'{"consumer_name": "s", "consumer_group": "stuck-%d-%d", "batch_size": %d, '
                                  b'"batch_max_wait_time_ms": 3000}' % (r, k, MESSAGES))
                     for k in range(STUCK_CLIENTS)]
            ports = {s.getsockname()[1] for s in socks}
            started = time.monotonic()
            await asyncio.sleep(1.0)  # the batches are fetched, encoded and stuck in the write buffers
            assert gateway.open_from(ports) == STUCK_CLIENTS
            other = await served_meanwhile(gateway, token)
            await wait_closed(gateway, ports, SEND_TIMEOUT_S + 5)
            for s in socks:
                s.close()
        rounds.append((rss.peak, gateway.rss(), time.monotonic() - started, other))
    print(f"\nFIGURES stuck readers ({STUCK_CLIENTS} clients x {MESSAGES} x {MESSAGE_BYTES // 1000} KB, "
          f"{response_mb:.1f} MB per response, send timeout {SEND_TIMEOUT_S:g} s): "
          f"RSS baseline {baseline / MB:.0f} MB; "
          + "; ".join(f"round {i + 1}: peak {p / MB:.0f} MB, after {a / MB:.0f} MB, stuck connections closed "
                      f"{t:.1f} s after connecting, other client served in {o * 1000:.0f} ms"
                      for i, (p, a, t, o) in enumerate(rounds)))
    (peak1, _, closed1, other1), (peak2, after2, closed2, other2) = rounds
    assert closed1 < SEND_TIMEOUT_S + CUT_SLACK_S and closed2 < SEND_TIMEOUT_S + CUT_SLACK_S
    assert other1 < 1.0 and other2 < 1.0
    # Bounded: a second round of stuck clients reuses the memory of the first instead of adding to it.
    assert peak2 < peak1 + 40 * MB, (peak1 / MB, peak2 / MB)
    assert after2 < baseline + STUCK_CLIENTS * 3 * response_mb * MB


async def test_stuck_stream_reader_is_cut_and_memory_stays_flat(gateway: Gateway, token: str) -> None:
    await fill(gateway, token, "flow")
    baseline = gateway.rss()
    with RssSampler(gateway) as rss:
        sock = stuck_client(gateway, token, "/stations/flow/consume/stream",
                            b'{"consumer_name": "s", "consumer_group": "stuck-stream", "batch_size": 100}')
        port = sock.getsockname()[1]
        started = time.monotonic()
        await fill(gateway, token, "flow")  # more data arrives while the reader is stuck
        other = await served_meanwhile(gateway, token)
        closed = await wait_closed(gateway, {port}, SEND_TIMEOUT_S + 8)
        sock.close()
    took = time.monotonic() - started
    print(f"\nFIGURES stuck stream reader ({2 * MESSAGES} x {MESSAGE_BYTES // 1000} KB available): RSS baseline "
          f"{baseline / MB:.0f} MB, peak {rss.peak / MB:.0f} MB, after {gateway.rss() / MB:.0f} MB; connection cut "
          f"{took:.1f} s after connecting (wait {closed:.1f} s); other client served in {other * 1000:.0f} ms")
    assert rss.peak < baseline + 60 * MB  # a few batches in flight, not the 40 MB of available data and more
    assert other < 1.0


async def test_idle_connections_are_closed(gateway: Gateway) -> None:
    def closed_after(request: bytes) -> float:
        with socket.create_connection(("127.0.0.1", gateway.http), timeout=KEEPALIVE_S + 5) as sock:
            started = time.monotonic()
            if request:
                sock.sendall(request)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            while sock.recv(65536):
                pass
            return time.monotonic() - started

    silent = await asyncio.to_thread(closed_after, b"")
    kept_alive = await asyncio.to_thread(
        closed_after, b"GET /monitoring/status HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    print(f"\nFIGURES idle HTTP connections (keep-alive timeout {KEEPALIVE_S:g} s): closed {silent:.2f} s after a "
          f"silent connect, {kept_alive:.2f} s after a keep-alive response")
    assert KEEPALIVE_S - 0.2 < silent < KEEPALIVE_S + 1.5
    assert KEEPALIVE_S - 0.2 < kept_alive < KEEPALIVE_S + 1.5
