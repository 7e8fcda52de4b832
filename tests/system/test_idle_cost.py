"""What idle clients cost the gateway: 10,000 long polls waiting on an empty station.

A consume with a long wait holds a connection, a request, a waiter on its group and a deadline;
while nothing arrives it must cost (almost) no CPU: the deadline sweep touches only buckets that
came due (gateway/core/deadlines.py). Measured on the real process with psutil. Run with -s for figures.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import psutil

from tests.processes import spawn_gateway

POLLS = 10_000
WAIT_MS = 60_000
OPEN_BATCH = 500
MEASURE_S = 5.0
CPU_SHARE_LIMIT = 0.03  # of one core


async def test_ten_thousand_idle_long_polls_cost_almost_no_cpu(tmp_path: Path) -> None:
    gw = spawn_gateway(tmp_path / "data", tmp_path / "gateway.log", "--log-level", "WARNING",
                       "--max-consume-wait-ms", str(WAIT_MS), "--request-timeout-s", "120")
    try:
        await gw.ready()
        proc = psutil.Process(gw.proc.pid)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
            async with http.post(gw.base + "/auth/authenticate", json={"username": "root", "password": "memphis"}) as r:
                token = (await r.json())["jwt"]
            headers = {"Authorization": f"Bearer {token}"}
            body = {"consumer_name": "idle", "consumer_group": "idle", "batch_size": 1,
                    "batch_max_wait_time_ms": WAIT_MS}
            async with http.post(gw.base + "/stations/idle/consume/batch", headers=headers,
                                 json={**body, "batch_max_wait_time_ms": 10}) as r:
                assert r.status == 200  # the station and group exist before the crowd comes
            rss_before = proc.memory_info().rss

            async def poll() -> int:
                async with http.post(gw.base + "/stations/idle/consume/batch", headers=headers, json=body) as r:
                    await r.read()
                    return r.status

            tasks: list[asyncio.Task[int]] = []
            started = time.monotonic()
            for _ in range(POLLS // OPEN_BATCH):
                tasks += [asyncio.create_task(poll()) for _ in range(OPEN_BATCH)]
                await asyncio.sleep(0.2)
            deadline = time.monotonic() + 60
            while sum(1 for c in proc.net_connections(kind="tcp") if c.laddr.port == gw.http
                      and c.status == psutil.CONN_ESTABLISHED) < POLLS:
                assert time.monotonic() < deadline, "the long polls did not all arrive"
                await asyncio.sleep(0.5)
            opened = time.monotonic() - started
            await asyncio.sleep(2.0)  # let the arrival work settle
            cpu0, t0 = proc.cpu_times(), time.monotonic()
            await asyncio.sleep(MEASURE_S)
            cpu1, t1 = proc.cpu_times(), time.monotonic()
            share = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / (t1 - t0)
            rss_per_poll = (proc.memory_info().rss - rss_before) / POLLS
            print(f"\n  {POLLS} idle long polls (opened in {opened:.1f} s): gateway CPU {share * 100:.2f}% of a core, "
                  f"RSS +{rss_per_poll / 1024:.1f} KiB per poll")
            assert all(not t.done() for t in tasks)  # still waiting: idle, not answered
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert share < CPU_SHARE_LIMIT
    finally:
        await asyncio.to_thread(gw.stop)
