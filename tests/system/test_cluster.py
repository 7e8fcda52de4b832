"""A 3-node NATS JetStream cluster on loopback, stations replicated 3 ways: kill one node during
produce and consume, then the node the gateway's broker connection is on; both go on, and no
acknowledged message is lost. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import nats
import pytest
from memgw.v1 import consume_pb2, produce_pb2
from memphis import Memphis
from nats.js.api import AckPolicy, ConsumerConfig

from gateway.embedded.server import ClusterSettings, EmbeddedBroker
from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer, running_gateway, settings_for
from tests.processes import free_port

NODES = 3
BROKER_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 15.0
LOAD_LIMIT_S = 150.0
SLACK_S = 0.5
RESUME_WITHIN_S = 30.0  # nats-server elects a new raft leader 4-9 s after losing one (more on a busy CI)


async def quiet(_err: Exception) -> None:
    return None


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[EmbeddedBroker]]:
    routes = [free_port() for _ in range(NODES)]
    base = tmp_path_factory.mktemp("cluster")
    nodes = [
        EmbeddedBroker(data_dir=base / f"n{i}", port=0, root_password=ROOT_PASSWORD, server_name=f"n{i}",
                       cluster=ClusterSettings(name="memgw-test", port=port, routes=routes))
        for i, port in enumerate(routes)
    ]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        await wait_jetstream(nodes, 30)
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def urls(nodes: list[EmbeddedBroker]) -> list[str]:
    return [n.url for n in nodes]


async def connect(nodes: list[EmbeddedBroker]) -> nats.aio.client.Client:
    return await nats.connect(urls(nodes), user=f"{ROOT_USER}$1", password=ROOT_PASSWORD, error_cb=quiet,
                              max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="tests::cluster")


async def wait_jetstream(nodes: list[EmbeddedBroker], within: float) -> None:
    """Until the JetStream meta group has a leader (account info answers)."""
    nc = await connect(nodes)
    try:
        deadline = time.monotonic() + within
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                assert time.monotonic() < deadline, "the JetStream cluster did not form"
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
async def gw(cluster: list[EmbeddedBroker], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clients]:
    broker = ",".join(f"127.0.0.1:{n.port}" for n in cluster)  # every node: the gateway tries them in turn
    settings = settings_for(broker, tmp_path_factory.mktemp("gw"), broker_timeout_s=BROKER_TIMEOUT_S)
    async with running_gateway(settings) as clients:
        yield clients


@dataclass
class Tally:
    acknowledged: set[str] = field(default_factory=set)
    consumed: list[tuple[float, str]] = field(default_factory=list)  # (request start, id)
    produced_at: list[float] = field(default_factory=list)  # request start of each acknowledged call
    errors: list[tuple[str, str, str, float, float]] = field(default_factory=list)  # kind, code, message, t, latency
    sent: int = 0


async def run_load(gw: Clients, token: str, station: str, tally: Tally, stop: asyncio.Event) -> None:
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
                                 headers={"Authorization": f"Bearer {token}"})

    async def rest_produce(ids: list[str]) -> tuple[str, str]:
        async with http.post(f"{gw.base}/stations/{station}/produce/batch", json=ids) as resp:
            body = json.loads(await resp.read())
            return str(resp.status), str(body.get("error") or body.get("message") or "")

    async def grpc_produce(ids: list[str]) -> tuple[str, str]:
        try:
            await gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(
                station=station, messages=[{"data": i.encode()} for i in ids]), metadata=bearer(token),
                timeout=CLIENT_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return err.code().name, err.details() or ""
        return "OK", ""

    async def rest_consume() -> tuple[str, str, list[str]]:
        async with http.post(f"{gw.base}/stations/{station}/consume/batch", json={
                "consumer_name": "c", "consumer_group": "g", "batch_size": 200, "batch_max_wait_time_ms": 300}) as resp:
            body = json.loads(await resp.read())
            if resp.status != 200:
                return str(resp.status), str(body.get("error") or ""), []
            return "200", "", [m["message"].strip('"') for m in body]

    async def grpc_consume() -> tuple[str, str, list[str]]:
        try:
            reply = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
                station=station, consumer_name="c2", consumer_group="g", batch_size=200, batch_max_wait_time_ms=300),
                metadata=bearer(token), timeout=CLIENT_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return err.code().name, err.details() or "", []
        return "OK", "", [m.message.decode().strip('"') for m in reply.messages]

    async def producer(kind: str, call) -> None:
        until = time.monotonic() + LOAD_LIMIT_S  # bounded in time, whatever the test does
        while not stop.is_set() and time.monotonic() < until:
            ids = [f"{kind}-{uuid.uuid4().hex[:8]}-{j}" for j in range(10)]
            start = time.monotonic()
            code, message = await call(ids)
            tally.sent += len(ids)
            if code in ("200", "OK"):
                tally.acknowledged.update(ids)
                tally.produced_at.append(start)
            else:
                tally.errors.append((kind, code, message, start, time.monotonic() - start))
                await asyncio.sleep(0.05)

    async def consumer(kind: str, call) -> None:
        while not stop.is_set():
            start = time.monotonic()
            code, message, got = await call()
            now = time.monotonic()
            tally.consumed.extend((start, i) for i in got)
            if code not in ("200", "OK"):
                tally.errors.append((kind, code, message, start, now - start))
                await asyncio.sleep(0.05)

    try:
        await asyncio.gather(producer("rest", rest_produce), producer("rest2", rest_produce),
                             producer("grpc", grpc_produce), producer("grpc2", grpc_produce),
                             consumer("rest-consume", rest_consume), consumer("grpc-consume", grpc_consume))
    finally:
        await http.close()


async def replicas_current(nodes: list[EmbeddedBroker], stream: str, within: float) -> float:
    """Seconds until the stream has a leader and every replica is current."""
    started = time.monotonic()
    nc = await connect([n for n in nodes if n.running])
    try:
        while True:
            try:
                info = await nc.jetstream().stream_info(stream)
                cluster = info.cluster
                if cluster and cluster.leader and cluster.replicas and len(cluster.replicas) == NODES - 1 and all(
                        r.current for r in cluster.replicas):
                    return time.monotonic() - started
            except Exception:
                pass
            assert time.monotonic() - started < within, f"{stream} replicas not current"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def stored(nodes: list[EmbeddedBroker], stream: str, within: float = 30) -> list[str]:
    """Every message body in the stream, read with an ephemeral consumer (retried while the cluster settles)."""
    nc = await connect([n for n in nodes if n.running])
    deadline = time.monotonic() + within
    try:
        js = nc.jetstream()
        while True:
            try:
                total = (await js.stream_info(stream)).state.messages
                psub = await js.pull_subscribe(f"{stream}.final", stream=stream,
                                               config=ConsumerConfig(ack_policy=AckPolicy.NONE))
                out: list[str] = []
                while len(out) < total:
                    batch = await psub.fetch(min(1000, total - len(out)), timeout=2)
                    out.extend(m.data.decode().strip('"') for m in batch)
                await psub.unsubscribe()
                return out
            except (nats.errors.TimeoutError, nats.js.errors.APIError):  # a consumer or leader settling
                assert time.monotonic() < deadline, "could not read the stream"
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def leaders(nodes: list[EmbeddedBroker], stream: str, durable: str) -> tuple[str | None, str | None]:
    nc = await connect([n for n in nodes if n.running])
    try:
        js = nc.jetstream()
        s, c = (await js.stream_info(stream)).cluster, (await js.consumer_info(stream, durable)).cluster
        return (s.leader if s else None), (c.leader if c else None)
    finally:
        await nc.close()


async def both_resumed(tally: Tally, since: float, within: float) -> None:
    while not (any(t > since for t in tally.produced_at) and any(t > since for t, _ in tally.consumed)):
        produced = any(t > since for t in tally.produced_at)
        consumed = any(t > since for t, _ in tally.consumed)
        assert time.monotonic() - since < within, (
            f"did not resume: produce {produced}, consume {consumed}; last errors {tally.errors[-3:]}")
        await asyncio.sleep(0.05)


def node_at(nodes: list[EmbeddedBroker], port: int | None) -> EmbeddedBroker | None:
    return next((n for n in nodes if n.port == port), None)


@pytest.mark.timeout(180)
async def test_node_loss_keeps_produce_and_consume_going(gw: Clients, cluster: list[EmbeddedBroker],
                                                         tmp_path: Path) -> None:
    token = await gw.rest_token()
    station = f"repl-{uuid.uuid4().hex[:8]}"
    stream = f"{station}$1"
    m = Memphis()
    await m.connect(host="127.0.0.1", port=cluster[0].port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=5000)
    try:
        await m.station(station, replicas=3, timeout_retries=0)  # through the gateway's control plane
    finally:
        await m.close()
    nc = await connect(cluster)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.config.num_replicas == 3
    await replicas_current(cluster, stream, 15)

    tally = Tally()
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(gw, token, station, tally, stop))
    events: list[tuple[str, float]] = []
    try:
        await asyncio.sleep(1.5)
        assert tally.acknowledged, tally.errors[:3]
        session = gw.gateway.broker.sessions()[0]
        connected = {session.nc.connected_url.port, gw.gateway.service_nc.connected_url.port}
        stream_leader, group_leader = await leaders(cluster, stream, "g-rest-gateway")
        spare = [n for n in cluster if n.port not in connected]
        victim = next((n for n in spare if n.server_name == stream_leader),
                      next((n for n in spare if n.server_name == group_leader), spare[0]))
        # 1. a node the gateway is not connected to (the stream leader when possible): it stays
        #    down until produce and consume have resumed without it (a raft election: 4-9 s)
        events.append((f"kill {victim.server_name} (not connected; leaders: stream {stream_leader}, "
                       f"consumer group {group_leader})", time.monotonic()))
        victim.kill()
        await both_resumed(tally, events[-1][1], RESUME_WITHIN_S)
        events.append(("produce and consume resumed", time.monotonic()))
        await asyncio.sleep(1)
        await victim.start()
        events.append((f"restart {victim.server_name}", time.monotonic()))
        caught_up = await replicas_current(cluster, stream, 20)
        events.append((f"{victim.server_name} current after {caught_up:.1f} s", time.monotonic()))
        await asyncio.sleep(1)
        # 2. the node the users' broker connection is on
        target = node_at(cluster, session.nc.connected_url.port)
        assert target is not None
        stream_leader, group_leader = await leaders(cluster, stream, "g-rest-gateway")
        events.append((f"kill {target.server_name} (the session's node; leaders: stream {stream_leader}, "
                       f"consumer group {group_leader})", time.monotonic()))
        target.kill()
        await both_resumed(tally, events[-1][1], RESUME_WITHIN_S)
        events.append(("produce and consume resumed", time.monotonic()))
        await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.wait_for(load, CLIENT_TIMEOUT_S + 5)
    reconnected_to = session.nc.connected_url.port if session.nc.connected_url else None
    await target.start()
    events.append((f"restart {target.server_name}", time.monotonic()))
    caught_up = await replicas_current(cluster, stream, 20)
    events.append((f"{target.server_name} current after {caught_up:.1f} s", time.monotonic()))
    in_store = await stored(cluster, stream)
    consumed = {i for _, i in tally.consumed}
    stored_set = set(in_store)
    lost = tally.acknowledged - stored_set

    def resumed(after: float, times: list[float]) -> float | None:
        later = [t for t in times if t > after]
        return min(later) - after if later else None

    kill_times = [t for name, t in events if name.startswith("kill")]
    consumed_times = [t for t, _ in tally.consumed]
    latencies = [e[4] for e in tally.errors]
    t0 = events[0][1]
    print(f"\nFIGURES 3-node cluster, R3 station, kill -9 during produce and consume "
          f"(broker_timeout {BROKER_TIMEOUT_S:g} s):")
    for name, t in events:
        print(f"  +{t - t0:5.1f} s {name}")
    for i, k in enumerate(kill_times):
        p, c = resumed(k, tally.produced_at), resumed(k, consumed_times)
        print(f"  kill {i + 1}: first call started after it and answered with success: produce "
              f"+{p if p is None else round(p, 2)} s, consume +{c if c is None else round(c, 2)} s")
    print(f"  messages sent {tally.sent}, acknowledged {len(tally.acknowledged)}, stored {len(stored_set)}, "
          f"lost {len(lost)}, duplicates {len(in_store) - len(stored_set)}, consumed {len(consumed)} "
          f"(redelivered {len(tally.consumed) - len(consumed)})")
    print(f"  error answers {len(tally.errors)}: {sorted({(e[0], e[1]) for e in tally.errors})}, "
          f"max latency {max(latencies, default=0) * 1000:.0f} ms; session reconnected to port {reconnected_to}")
    print(f"  messages: {sorted({e[2] for e in tally.errors})[:3]}")

    assert not lost, f"{len(lost)} acknowledged messages lost: {sorted(lost)[:5]}"
    # A failover may store a message twice (seen once: 1 in 212,520 after killing the stream
    # leader; at-least-once across a leader change). Idempotency keys (Nats-Msg-Id) remove them;
    # the figure is printed above and must stay rare.
    assert len(in_store) - len(stored_set) <= max(1, len(stored_set) // 10_000), "duplicates in the stream"
    assert consumed <= stored_set
    for kind, code, message, _, latency in tally.errors:
        assert code in ("503", "UNAVAILABLE"), (kind, code, message)
        assert message.startswith("broker unavailable"), message
        assert latency <= BROKER_TIMEOUT_S + SLACK_S, (kind, latency)
    for k in kill_times:  # both produce and consume went on after each kill, the node still down
        assert resumed(k, tally.produced_at) is not None and resumed(k, tally.produced_at) < RESUME_WITHIN_S
        assert resumed(k, consumed_times) is not None and resumed(k, consumed_times) < RESUME_WITHIN_S
    assert reconnected_to is not None and reconnected_to != target.port
