"""Broker killed mid-load: kill -9 the nats-server under REST and gRPC load, restart it on the
same store, and count.

Every message that got a success answer must be in the stream afterwards; requests during
the outage fail fast with 503 / UNAVAILABLE and a clear message (never a 500, never past the
broker deadline); the gateway recovers by itself; /monitoring/status says 503 while the
broker is away. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from memgw.v1 import auth_pb2, consume_pb2, produce_pb2
from nats.js.api import AckPolicy, ConsumerConfig

from gateway.embedded.server import EmbeddedBroker
from tests.conftest import connect_root
from tests.harness import ROOT_USER, Clients, bearer, running_gateway, settings_for

BROKER_TIMEOUT_S = 5.0  # the default broker_timeout_s
OUTAGE_S = 3.0
AFTER_RECOVERY_S = 1.5
MAX_REQUESTS_PER_WORKER = 4000
CLIENT_TIMEOUT_S = 15.0  # a request still open after this is a hang
ERROR_BACKOFF_S = 0.05  # what a client does on 503 (Retry-After says 1 s; we hurry)
SLACK_S = 0.5  # scheduling slack on top of the deadline


@dataclass(slots=True)
class Answer:
    kind: str  # "rest-single", "grpc-batch", "rest-consume", ...
    ids: list[str]
    start: float
    end: float
    ok: bool
    code: str  # HTTP status or gRPC code name
    message: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


@pytest.fixture(scope="module")
async def gw(nats_server: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Clients:
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("gw"), broker_timeout_s=BROKER_TIMEOUT_S)
    async with running_gateway(settings) as clients:
        yield clients


class Load:
    """Bounded concurrent producers and consumers over both protocols, every answer recorded."""

    def __init__(self, gw: Clients, token: str, station: str) -> None:
        self.gw, self.token, self.station = gw, token, station
        self.answers: list[Answer] = []
        self.stop = asyncio.Event()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S))

    async def close(self) -> None:
        await self.http.close()

    async def worker(self, kind: str, call: Callable[[list[str]], Awaitable[tuple[bool, str, str]]],
                     ids_per_call: int) -> None:
        for n in range(MAX_REQUESTS_PER_WORKER):
            if self.stop.is_set():
                return
            tag = uuid.uuid4().hex[:8]
            ids = [f"{kind}-{tag}-{n}-{j}" for j in range(ids_per_call)]
            start = time.monotonic()
            try:
                ok, code, message = await call(ids)
            except TimeoutError:
                ok, code, message = False, "CLIENT-TIMEOUT", "no answer"
            self.answers.append(Answer(kind, ids, start, time.monotonic(), ok, code, message))
            if not ok:
                await asyncio.sleep(ERROR_BACKOFF_S)

    # -- the calls -------------------------------------------------------------------------

    async def _rest(self, path: str, **kwargs: object) -> tuple[bool, str, str, object]:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        async with self.http.post(self.gw.base + path, headers=headers, **kwargs) as resp:  # type: ignore[arg-type]
            body = json.loads(await resp.read())
            message = body.get("error") or body.get("message") or "" if isinstance(body, dict) else ""
            return resp.status == 200, str(resp.status), str(message or ""), body

    async def rest_single(self, ids: list[str]) -> tuple[bool, str, str]:
        ok, code, message, _ = await self._rest(f"/stations/{self.station}/produce/single", data=ids[0].encode(),
                                                headers={"Content-Type": "text/plain"})
        return ok, code, message

    async def rest_batch(self, ids: list[str]) -> tuple[bool, str, str]:
        ok, code, message, _ = await self._rest(f"/stations/{self.station}/produce/batch", json=ids)
        return ok, code, message

    async def rest_consume(self, ids: list[str]) -> tuple[bool, str, str]:
        ok, code, message, _ = await self._rest(
            f"/stations/{self.station}/consume/batch",
            json={"consumer_name": "faults", "consumer_group": "rest", "batch_size": 100,
                  "batch_max_wait_time_ms": 300})
        return ok, code, message

    async def _grpc(self, call: Awaitable[object]) -> tuple[bool, str, str]:
        try:
            await call
        except grpc.aio.AioRpcError as err:
            return False, err.code().name, err.details() or ""
        return True, "OK", ""

    async def grpc_single(self, ids: list[str]) -> tuple[bool, str, str]:
        request = produce_pb2.ProduceSingleRequest(
            station=self.station, body={"content_type": "text/plain", "data": ids[0].encode()})
        return await self._grpc(self.gw.produce.ProduceSingle(request, metadata=bearer(self.token),
                                                              timeout=CLIENT_TIMEOUT_S))

    async def grpc_batch(self, ids: list[str]) -> tuple[bool, str, str]:
        request = produce_pb2.ProduceBatchRequest(station=self.station, messages=[{"data": i.encode()} for i in ids])
        return await self._grpc(self.gw.produce.ProduceBatch(request, metadata=bearer(self.token),
                                                             timeout=CLIENT_TIMEOUT_S))

    async def grpc_consume(self, ids: list[str]) -> tuple[bool, str, str]:
        request = consume_pb2.ConsumeBatchRequest(station=self.station, consumer_name="faults", consumer_group="grpc",
                                                  batch_size=100, batch_max_wait_time_ms=300)
        return await self._grpc(self.gw.consume.ConsumeBatch(request, metadata=bearer(self.token),
                                                             timeout=CLIENT_TIMEOUT_S))


async def poll_status(gw: Clients, stop: asyncio.Event, seen: list[tuple[float, int]]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as http:
        while not stop.is_set():
            async with http.get(gw.base + "/monitoring/status") as resp:
                await resp.read()
                seen.append((time.monotonic(), resp.status))
            await asyncio.sleep(0.1)


async def stored_ids(broker: EmbeddedBroker, station: str) -> list[str]:
    """Every message body in the station's stream, read with nats-py (not through the gateway)."""
    nc = await connect_root(broker, name="tests::faults-reader")
    try:
        js = nc.jetstream()
        stream = f"{station}$1"
        total = (await js.stream_info(stream)).state.messages
        # an ephemeral consumer from the start, without acks (no pending limit)
        psub = await js.pull_subscribe(f"{stream}.final", stream=stream,
                                       config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        out: list[str] = []
        while len(out) < total:
            for msg in await psub.fetch(min(1000, total - len(out)), timeout=5):
                out.append(msg.data.decode().strip('"'))  # batch elements are stored as JSON strings
        await psub.unsubscribe()
        return out
    finally:
        await nc.close()


async def probe_login(gw: Clients, probes: list[Answer]) -> None:
    """A login that needs a new broker connection must be answered, not hang in memphis-py's connect."""
    start = time.monotonic()
    try:
        await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER, password="not-the-one"),
                                   timeout=CLIENT_TIMEOUT_S)
        probes.append(Answer("login", [], start, time.monotonic(), True, "OK"))
    except grpc.aio.AioRpcError as err:
        probes.append(Answer("login", [], start, time.monotonic(), False, err.code().name, err.details() or ""))


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def test_broker_killed_mid_load_loses_no_acknowledged_message(gw: Clients, nats_server: EmbeddedBroker) -> None:
    token = await gw.rest_token()
    station = f"faults-{uuid.uuid4().hex[:8]}"
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"warm-up", token=token,
                                    headers={"Content-Type": "text/plain"})
    assert status == 200, body
    load = Load(gw, token, station)
    producers = [("rest-single", load.rest_single, 1)] * 4 + [("grpc-single", load.grpc_single, 1)] * 4 + [
        ("rest-batch", load.rest_batch, 20), ("grpc-batch", load.grpc_batch, 20)]
    consumers = [("rest-consume", load.rest_consume, 0), ("grpc-consume", load.grpc_consume, 0)]
    tasks = [asyncio.create_task(load.worker(kind, call, n)) for kind, call, n in producers + consumers]
    statuses: list[tuple[float, int]] = []
    poller = asyncio.create_task(poll_status(gw, load.stop, statuses))
    probes: list[Answer] = []
    try:
        await asyncio.sleep(1.5)
        t_kill = time.monotonic()
        nats_server.kill()  # SIGKILL: no flush, no goodbye
        await asyncio.sleep(0.5)
        login = asyncio.create_task(probe_login(gw, probes))  # a new login during the outage
        await asyncio.sleep(max(0.0, t_kill + OUTAGE_S - time.monotonic()))
        await login
        t_restart_begin = time.monotonic()
        await nats_server.start()
        t_restart = time.monotonic()
        recovered: float | None = None
        while recovered is None and time.monotonic() - t_restart < 20:
            await asyncio.sleep(0.05)
            done = [a.end for a in load.answers if a.ok and a.start > t_restart and "consume" not in a.kind]
            recovered = min(done) if done else None
        assert recovered is not None, "produce did not recover within 20 s of the restart"
        await asyncio.sleep(AFTER_RECOVERY_S)
    finally:
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, poller, return_exceptions=True), CLIENT_TIMEOUT_S + 5)
        await load.close()
    t_end = time.monotonic()

    answers = load.answers
    produced = [a for a in answers if "consume" not in a.kind]
    acknowledged = {i for a in produced if a.ok for i in a.ids}
    refused = {i for a in produced if not a.ok for i in a.ids}
    sent = sum(len(a.ids) for a in produced)
    stored_list = await stored_ids(nats_server, station)
    stored = set(stored_list)
    lost = acknowledged - stored
    duplicates = len(stored_list) - len(stored)
    errors = [a for a in answers if not a.ok] + [p for p in probes if not p.ok]
    error_latency = [a.latency for a in errors]
    consumed_after = [a for a in answers if "consume" in a.kind and a.ok and a.start > recovered]
    outage_statuses = [s for t, s in statuses if t_kill + 0.3 < t < t_restart_begin]
    final_statuses = [s for t, s in statuses if t > recovered + 0.5]

    print(f"\nFIGURES broker kill -9 mid-load (broker_timeout {BROKER_TIMEOUT_S:g} s, outage {OUTAGE_S:g} s):")
    print(f"  produce requests {len(produced)}: messages sent {sent}, acknowledged {len(acknowledged)}, "
          f"refused {len(refused)}, stored {len(stored)} (+1 warm-up), lost {len(lost)}, duplicates {duplicates}, "
          f"stored though refused {len(refused & stored)}")
    print(f"  error answers {len(errors)} "
          f"({', '.join(sorted({f'{a.kind}:{a.code}' for a in errors}))}); latency p50 "
          f"{pct(error_latency, 50) * 1000:.1f} ms, max {max(error_latency) * 1000:.1f} ms")
    print(f"  restart took {t_restart - t_restart_begin:.2f} s; first acknowledged produce "
          f"{recovered - t_restart:.2f} s after the broker was ready ({recovered - t_kill:.2f} s after the kill)")
    print(f"  /monitoring/status during outage: {sorted(set(outage_statuses))} ({len(outage_statuses)} polls), "
          f"after recovery: {sorted(set(final_statuses))}; consume calls OK after recovery: {len(consumed_after)}")
    by_kind = {}
    for a in errors:
        by_kind.setdefault(a.kind, []).append(a.latency)
    worst = ", ".join(f"{k} {max(v) * 1000:.0f} ms" for k, v in sorted(by_kind.items()))
    print(f"  error latency max by kind: {worst}")
    print(f"  sample messages: {sorted({(a.code, a.message) for a in errors})[:4]}")
    print(f"  run {t_end - t_kill:.1f} s from the kill")

    # No publish batch was left behind: every one was acknowledged, failed or timed out.
    for session in gw.gateway.broker.sessions():
        assert session.publisher is None or not session.publisher._batches
    assert not lost, f"{len(lost)} acknowledged messages are not stored: {sorted(lost)[:5]}"
    assert duplicates == 0
    assert len(acknowledged) > 500 and errors, "the load did not span the outage"
    for a in errors:
        assert a.code in ("503", "UNAVAILABLE"), (a.kind, a.code, a.message)
        assert a.message.startswith("broker unavailable"), a.message
        assert a.latency <= BROKER_TIMEOUT_S + SLACK_S, (a.kind, a.latency)
        assert t_kill - SLACK_S <= a.start <= recovered + SLACK_S, ("error outside the outage", a)
    assert probes[0].code == "UNAVAILABLE", probes
    assert outage_statuses and set(outage_statuses) == {503}
    assert final_statuses and set(final_statuses) == {200}
    assert {a.kind for a in consumed_after} == {"rest-consume", "grpc-consume"}
    assert recovered - t_restart < 5.0


async def test_hung_broker_answers_within_the_deadline(gw: Clients, nats_server: EmbeddedBroker) -> None:
    """SIGSTOP: the TCP connection stays up but nothing answers. Calls end at the broker deadline (503)."""
    token = await gw.rest_token()
    station = f"hung-{uuid.uuid4().hex[:8]}"
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"warm-up", token=token,
                                    headers={"Content-Type": "text/plain"})
    assert status == 200, body
    load = Load(gw, token, station)
    workers = [("rest-single", load.rest_single, 1)] * 2 + [("grpc-single", load.grpc_single, 1)] * 2 + [
        ("rest-batch", load.rest_batch, 20)]
    tasks = [asyncio.create_task(load.worker(kind, call, n)) for kind, call, n in workers]
    pid = nats_server.pid
    assert pid is not None
    connections = [gw.gateway.service_nc, *(s.nc for s in gw.gateway.broker.sessions())]
    try:
        await asyncio.sleep(0.5)
        t_stop = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.2)
            started = time.monotonic()
            status, body, _ = await gw.get("/monitoring/status")
            status_took = time.monotonic() - started
            await asyncio.sleep(BROKER_TIMEOUT_S + 1.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        t_cont = time.monotonic()
        await asyncio.sleep(2.0)
    finally:
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), CLIENT_TIMEOUT_S + 5)
        await load.close()
    produced = load.answers
    errors = [a for a in produced if not a.ok]
    acknowledged = {i for a in produced if a.ok for i in a.ids}
    stored = set(await stored_ids(nats_server, station))
    resumed = min((a.end - t_cont for a in produced if a.ok and a.start > t_cont), default=None)
    print(f"\nFIGURES hung broker (SIGSTOP {t_cont - t_stop:.1f} s, broker_timeout {BROKER_TIMEOUT_S:g} s): "
          f"{len(errors)} error answers, latency max {max(a.latency for a in errors):.2f} s; /monitoring/status "
          f"{status} in {status_took:.2f} s; acknowledged {len(acknowledged)}, lost {len(acknowledged - stored)}, "
          f"stored though refused {len({i for a in errors for i in a.ids} & stored)}; first success "
          f"{resumed if resumed is None else round(resumed, 2)} s after SIGCONT")
    assert errors
    # A PONG arriving after its flush() timed out stops nats-py's read loop for good (a deaf
    # connection that says it is connected): the health check and acks must not use flush().
    assert not any(nc._reading_task.done() for nc in connections)
    created, body, _ = await gw.post(f"/stations/{station}-new/produce/single", raw=b"x", token=token,
                                     headers={"Content-Type": "text/plain"})  # needs the control plane
    assert created == 200, body
    for a in errors:
        assert a.code in ("503", "UNAVAILABLE") and a.message.startswith("broker unavailable"), a
        assert a.latency <= BROKER_TIMEOUT_S + SLACK_S, (a.kind, a.latency)
    assert status == 503 and status_took < 2.5
    assert not acknowledged - stored
    assert resumed is not None and resumed < 2.0
