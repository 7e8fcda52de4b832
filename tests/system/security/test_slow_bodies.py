"""Issue 10, item 2: clients without a token hold memory and connections with request bodies.

The body was read before the token was checked and body reads had no deadline: 100 tokenless
connections each sending 8 MiB minus one byte held ~900 MB; 1000 connections trickling body
bytes were all still open at 45 s. The token (and route) must be checked before the body is
read, body reads need a deadline, and the body bytes in flight a cap.

The gateway runs with ``--request-timeout-s 10``: a body read may not outlive that (+5 s slack).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.system.security.conftest import MB, Api, GatewayProcess, RssWatch, figure

REQUEST_TIMEOUT_S = 10
GATEWAY_ARGS = ["--request-timeout-s", str(REQUEST_TIMEOUT_S)]
BIG = 8 * MB  # the default --max-body-bytes


class RawConn:
    """One HTTP/1.1 connection that sends a request head and then its body as the test likes."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.status: int | None = None
        self.answered_at: float | None = None
        self.closed_at: float | None = None
        self.start = time.monotonic()

    async def open(self, path: str, length: int, token: str | None = None) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.gw.http_port)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.writer.write((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n{auth}"
                           f"Content-Length: {length}\r\n\r\n").encode())
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            line = await self.reader.readline()
            if line.startswith(b"HTTP/"):
                self.status = int(line.split()[1])
                self.answered_at = time.monotonic() - self.start
            while await self.reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        self.closed_at = time.monotonic() - self.start

    async def send(self, data: bytes | memoryview, wait_s: float = 10) -> bool:
        """False once the server stopped taking bytes (closed, or not reading within ``wait_s``)."""
        if self.closed_at is not None:
            return False
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), wait_s)
            return True
        except (ConnectionError, OSError, TimeoutError):
            return False

    @property
    def open_now(self) -> bool:
        return self.closed_at is None

    async def close(self) -> None:
        self.writer.transport.abort()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def open_many(gw: GatewayProcess, n: int, path: str, length: int, token: str | None = None) -> list[RawConn]:
    conns = [RawConn(gw) for _ in range(n)]
    await asyncio.gather(*(c.open(path, length, token) for c in conns))
    return conns


@pytest.mark.fresh_gateway
@pytest.mark.timeout(120)
async def test_tokenless_big_bodies_are_refused_before_they_are_read(api: Api, gw: GatewayProcess,
                                                                      station: str) -> None:
    await api.produce_text(station, "exists")
    chunk = memoryview(b"x" * MB)
    with RssWatch(gw) as watch:
        conns = await open_many(gw, 100, f"/stations/{station}/produce/single", BIG)
        for c in conns:  # the first MiB of each
            await c.send(chunk[:64 * 1024])
        await asyncio.sleep(2)
        early = sum(1 for c in conns if c.status == 401)
        # the rest of the body but one byte, as the attack did
        for _ in range(7):
            await asyncio.gather(*(c.send(chunk) for c in conns))
        await asyncio.gather(*(c.send(chunk[: MB - 64 * 1024 - 1]) for c in conns))
        await asyncio.sleep(1)
        held = gw.tcp(local_port=gw.http_port)
        statuses = sorted({c.status for c in conns}, key=str)
    for c in conns:
        await c.close()
    figure("tokenless-big-bodies", f"100 x (8 MiB - 1) without a token: 401 before the body for {early}/100, "
           f"statuses {statuses}, {held} connections still open, {watch.describe()}",
           early_401=early, held=held, rss_mb=watch.growth_mb, killed=watch.killed)
    assert early == 100
    assert watch.growth_mb < 100
    assert held <= 5


@pytest.mark.fresh_gateway
@pytest.mark.timeout(120)
async def test_tokenless_trickled_bodies_are_cut_off(api: Api, gw: GatewayProcess, station: str) -> None:
    await api.produce_text(station, "exists")
    with RssWatch(gw) as watch:
        conns = await open_many(gw, 200, f"/stations/{station}/produce/single", 1000)
        t = time.monotonic()
        while time.monotonic() - t < 12:
            await asyncio.gather(*(c.send(b"x", wait_s=1) for c in conns if c.open_now))
            await asyncio.sleep(1)
        still = sum(1 for c in conns if c.open_now)
        answered = [c.answered_at for c in conns if c.status == 401 and c.answered_at is not None]
    for c in conns:
        await c.close()
    slowest = max(answered) if answered else None
    figure("tokenless-trickle", f"200 connections trickling 1 byte/s without a token: {len(answered)} answered 401 "
           f"(slowest {slowest if slowest is None else round(slowest, 1)} s), {still} still open at 12 s, "
           f"{watch.describe()}", answered=len(answered), open_at_12s=still, rss_mb=watch.growth_mb)
    assert len(answered) == 200 and slowest is not None and slowest < 3
    assert still == 0


@pytest.mark.timeout(120)
async def test_authenticated_trickled_bodies_have_a_deadline(api: Api, gw: GatewayProcess, station: str) -> None:
    await api.produce_text(station, "exists")
    token = await api.token()
    conns = await open_many(gw, 50, f"/stations/{station}/produce/single", 1000, token)
    t = time.monotonic()
    limit = REQUEST_TIMEOUT_S + 5
    while time.monotonic() - t < limit:
        await asyncio.gather(*(c.send(b"x", wait_s=1) for c in conns if c.open_now))
        await asyncio.sleep(1)
    still = sum(1 for c in conns if c.open_now)
    statuses = sorted({c.status for c in conns}, key=str)
    for c in conns:
        await c.close()
    figure("token-trickle", f"50 authenticated connections trickling 1 byte/s: {still} still open at {limit} s "
           f"(--request-timeout-s {REQUEST_TIMEOUT_S}), statuses {statuses}", open=still, after_s=limit)
    assert still == 0


@pytest.mark.fresh_gateway
@pytest.mark.timeout(120)
async def test_authenticated_big_bodies_in_flight_are_capped(api: Api, gw: GatewayProcess, station: str) -> None:
    """60 authenticated clients each holding 8 MiB - 1 of body: the bytes in flight are capped."""
    await api.produce_text(station, "exists")
    token = await api.token()
    chunk = memoryview(b"x" * MB)
    with RssWatch(gw) as watch:
        conns = await open_many(gw, 60, f"/stations/{station}/produce/single", BIG, token)
        for _ in range(7):
            await asyncio.gather(*(c.send(chunk, wait_s=3) for c in conns))
        await asyncio.gather(*(c.send(chunk[:-1], wait_s=3) for c in conns))
        await asyncio.sleep(1)
        statuses = sorted({c.status for c in conns}, key=str)
    for c in conns:
        await c.close()
    figure("token-big-bodies", f"60 x (8 MiB - 1) with a token: {watch.describe()}, statuses {statuses}",
           rss_mb=watch.growth_mb, killed=watch.killed)
    assert watch.growth_mb < 200
