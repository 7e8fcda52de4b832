"""--workers 2: two gateway processes share the ports, and both serve requests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tests.processes import free_port, wait_http


def test_two_workers_both_serve(tmp_path: Path) -> None:
    port, grpc_port, broker = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--http-port", str(port),
         "--grpc-port", str(grpc_port), "--broker-port", str(broker), "--data-dir", str(tmp_path / "data"),
         "--log-level", "WARNING"],
    )
    try:
        status, _ = wait_http(f"http://127.0.0.1:{port}/monitoring/status", 30)
        assert status == 200
        supervisor = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        while True:  # both workers listening
            workers = [c for c in supervisor.children() if "gateway" in " ".join(c.cmdline())]
            listening = {w.pid for w in workers
                         if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in w.net_connections())}
            if len(listening) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(listening) == 2, f"workers listening: {listening}"
        # Hold 24 connections open, each having served a request, and see who holds them.
        conns = []
        for _ in range(24):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/auth/authenticate", body=json.dumps({"username": "root", "password": "memphis"}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["jwt"]
            conns.append(conn)
        served_by = {w.pid: sum(1 for c in w.net_connections() if c.status == psutil.CONN_ESTABLISHED
                                and c.laddr.port == port) for w in workers}
        print(f"\n  connections per worker: {served_by}")
        assert all(n > 0 for n in served_by.values()), served_by
        for conn in conns:
            conn.close()
        # a token issued by one worker is accepted by the other (same secret)
        token = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/auth/authenticate", method="POST",
            data=json.dumps({"username": "root", "password": "memphis"}).encode(),
            headers={"Content-Type": "application/json"}), timeout=10).read())["jwt"]
        for _ in range(8):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/stations/w/produce/single", method="POST",
                                         data=b"x", headers={"Content-Type": "text/plain",
                                                             "Authorization": f"Bearer {token}"})
            assert urllib.request.urlopen(req, timeout=10).status == 200
        # a user made through a worker can log in: the supervisor, which owns the nats-server, applied it
        req = urllib.request.Request(f"http://127.0.0.1:{port}/users", method="POST", data=json.dumps(
            {"username": "wuser", "password": "w-password", "permissions": {"produce": ["w"]}}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        deadline = time.monotonic() + 5
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/auth/authenticate", method="POST",
                    data=json.dumps({"username": "wuser", "password": "w-password"}).encode(),
                    headers={"Content-Type": "application/json"}), timeout=10)
                break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline, "the new user cannot log in"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


async def test_workers_auto_add_up_metrics_and_drain_every_worker(tmp_path: Path) -> None:
    """--workers auto on this machine: one scrape counts every worker's calls; SIGTERM drains all of them."""
    import asyncio
    import re

    import aiohttp

    n = len(os.sched_getaffinity(0))
    port, grpc_port, broker = free_port(), free_port(), free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
        [sys.executable, "-m", "gateway", "serve", "--workers", "auto", "--http-port", str(port),
         "--grpc-port", str(grpc_port), "--broker-port", str(broker), "--data-dir", str(tmp_path / "data"),
         "--log-level", "WARNING"],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert (await asyncio.to_thread(wait_http, base + "/monitoring/status", 30))[0] == 200
        deadline = time.monotonic() + 20
        while len([c for c in psutil.Process(proc.pid).children() if "gateway" in " ".join(c.cmdline())]) < n:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # every worker listening
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/auth/authenticate", json={"username": "root", "password": "memphis"}) as r:
                token = (await r.json())["jwt"]
        produced = 40
        for i in range(produced):  # a new connection each: the kernel spreads them over the workers
            async with aiohttp.ClientSession() as http, http.post(
                    f"{base}/stations/sum/produce/single", data=f"m{i}",
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}) as r:
                assert r.status == 200
        seen = set()
        for _ in range(6):  # each scrape reaches some worker: all must show the total
            async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as r:
                text = await r.text()
            m = re.search(r'memphis_gateway_calls_total\{code="OK",method="/memgw.v1.ProduceService/ProduceSingle"\} '
                          r'([0-9.]+)', text)
            assert m is not None, text[:2000]
            seen.add(float(m.group(1)))
        print(f"\n  ProduceSingle OK per scrape: {sorted(seen)} (produced {produced}, {n} workers)")
        assert seen == {float(produced)}

        async def long_poll(i: int) -> int:
            async with aiohttp.ClientSession() as http, http.post(
                    f"{base}/stations/idle/consume/batch", headers={"Authorization": f"Bearer {token}"},
                    json={"consumer_name": f"c{i}", "batch_max_wait_time_ms": 3000}) as r:
                return r.status

        polls = [asyncio.create_task(long_poll(i)) for i in range(6)]
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        statuses = await asyncio.gather(*polls)
        assert statuses == [200] * 6, statuses
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
