"""Attacks on the HTTP edge at scale, against the real CLI process (issue 10; run with ``-s``).

Before the fixes: 100 tokenless connections each sending 8 MiB - 1 held ~900 MB of the gateway
(the body was read before the token was checked), and 1000 connections trickling body bytes were
all still open at 45 s (no body-read deadline). Now the token is checked before the body is read
(the gateway holds at most aiohttp's read buffer per connection, ~0.5 MB at peak) and a body not all
there within --body-read-timeout-s is 408, its connection closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import psutil
import pytest

from tests.processes import GatewayProcess as Gateway
from tests.processes import spawn_gateway

BODY_TIMEOUT_S = 2.0
TOKENLESS, TOKENLESS_BYTES = 100, 8 * 1024 * 1024 - 1
TRICKLERS = 300
MB = 1024 * 1024


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge")
    gw = spawn_gateway(tmp / "data", tmp / "gateway.log", "--log-level", "WARNING",
                       "--body-read-timeout-s", str(BODY_TIMEOUT_S))
    try:
        yield await gw.ready()
    finally:
        await asyncio.to_thread(gw.stop)


@pytest.fixture(scope="module")
async def token(gateway: Gateway) -> str:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.base + "/auth/authenticate", json={"username": "root", "password": "memphis"}) as resp:
        return str((await resp.json())["jwt"])


def head(path: str, length: int, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def test_tokenless_bodies_are_not_held(gateway: Gateway) -> None:
    rss_before = gateway.rss()
    peak = rss_before
    chunk = b"x" * (256 * 1024)

    async def attacker() -> int:
        """Sends up to 8 MiB - 1 of body; returns the bytes the gateway took before closing."""
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.http)
        sent = 0
        try:
            writer.write(head("/stations/s/produce/batch", TOKENLESS_BYTES, None))
            while sent + len(chunk) < TOKENLESS_BYTES:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
        return sent

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, gateway.rss())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        sent = await asyncio.wait_for(asyncio.gather(*(attacker() for _ in range(TOKENLESS))), 60)
    finally:
        sampler.cancel()
    took = time.monotonic() - started
    print(f"\n[{TOKENLESS} tokenless connections, bodies of 8 MiB - 1] done in {took:.1f} s; "
          f"{sum(sent) / MB:.0f} MB written by the clients before the gateway closed them; "
          f"gateway RSS {rss_before / MB:.0f} -> peak {peak / MB:.0f} MB (before: ~900 MB held)")
    # what is left: aiohttp's read buffer of each connection, filled before the refusal (~0.5 MB at
    # most: one socket read + its high-water mark), never the body
    assert peak - rss_before < TOKENLESS * 1.5 * MB


async def test_trickled_bodies_are_cut_at_the_deadline(gateway: Gateway, token: str) -> None:
    conns = []
    for _ in range(TRICKLERS):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http)
        writer.write(head("/stations/s/produce/batch", 1000, token) + b"[")
        conns.append((reader, writer))
    ports = {w.get_extra_info("sockname")[1] for _, w in conns}
    answers = [asyncio.create_task(reader.readline()) for reader, _ in conns]
    started = time.monotonic()

    def open_now() -> int:
        return sum(1 for c in psutil.Process(gateway.proc.pid).net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == gateway.http and c.raddr and c.raddr.port in ports
                   and c.status == psutil.CONN_ESTABLISHED)

    try:
        counts = []
        for _ in range(int(BODY_TIMEOUT_S + 6)):
            await asyncio.sleep(1.0)
            for (_, writer), answer in zip(conns, answers, strict=True):
                if not answer.done() and not writer.is_closing():
                    writer.write(b" ")
            counts.append(open_now())
        await asyncio.wait(answers, timeout=1.0)
        statuses = []
        for answer in answers:
            if not answer.done():
                statuses.append("none")
            elif answer.exception() is not None:
                statuses.append(type(answer.exception()).__name__)
            else:
                line = answer.result()
                statuses.append(line.split(b" ")[1].decode() if line else "closed")
    finally:
        for answer in answers:
            answer.cancel()
        for _, writer in conns:
            writer.close()
    took = time.monotonic() - started
    print(f"\n[{TRICKLERS} connections trickling a body, 1 byte/s] open each second: {counts} "
          f"(deadline {BODY_TIMEOUT_S} s; before: all open at 45 s); answers: "
          f"{ {s: statuses.count(s) for s in set(statuses)} } after {took:.0f} s")
    assert counts[-1] == 0
    assert statuses.count("408") == TRICKLERS
