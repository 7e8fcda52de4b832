"""Consuming like a streaming platform: message metadata, consumer group settings on first use,
a producer name per request; over REST and gRPC."""

from __future__ import annotations

import asyncio
import datetime
import uuid

from memgw.v1 import consume_pb2, produce_pb2

from gateway.core.names import stream_name
from tests.conftest import connect_root
from tests.harness import Clients, bearer


def name() -> str:
    return f"cs-{uuid.uuid4().hex[:8]}"


async def test_include_metadata_rest(gw: Clients, token: str) -> None:
    st = name()
    assert (await gw.post("/stations", {"name": st, "partitions_number": 2}, token=token))[0] == 200
    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    assert (await gw.post(f"/stations/{st}/produce/batch", [1, 2, 3, 4], token=token))[0] == 200
    status, body, _ = await gw.post(f"/stations/{st}/consume/batch", {
        "consumer_name": "c", "batch_size": 4, "batch_max_wait_time_ms": 1000, "include_metadata": True}, token=token)
    assert status == 200 and len(body) == 4, body
    for m in body:
        assert set(m) == {"message", "headers", "sequence", "partition", "timestamp", "deliveries"}
        assert m["partition"] in (1, 2) and m["sequence"] in (1, 2) and m["deliveries"] == 1
        when = datetime.datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00"))
        assert before <= when <= datetime.datetime.now(datetime.UTC)
    assert sorted((m["partition"], m["sequence"]) for m in body) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # without the flag: the Memphis REST gateway's shape
    assert (await gw.post(f"/stations/{st}/produce/single", raw=b"x", token=token,
                          headers={"Content-Type": "text/plain"}))[0] == 200
    status, body, _ = await gw.post(f"/stations/{st}/consume/batch",
                                    {"consumer_name": "c", "batch_max_wait_time_ms": 500}, token=token)
    assert set(body[0]) == {"message", "headers"}


async def test_group_settings_and_redelivery_count_grpc(gw: Clients) -> None:
    md = bearer(await gw.grpc_token())
    st = name()
    await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=st, body={"content_type": "text/plain", "data": b"again"}), metadata=md)
    req = consume_pb2.ConsumeBatchRequest(
        station=st, consumer_name="r", consumer_group="redeliver", batch_size=1, batch_max_wait_time_ms=1000,
        ack_mode=consume_pb2.ACK_MODE_EXPLICIT, include_metadata=True, max_msg_deliveries=2, max_ack_time_ms=300)
    first = (await gw.consume.ConsumeBatch(req, metadata=md)).messages
    assert [(m.message, m.deliveries, m.sequence, m.partition) for m in first] == [(b"again", 1, 1, 1)]
    assert first[0].timestamp.seconds > 0
    await asyncio.sleep(0.5)  # not acknowledged within the group's 300 ms
    second = (await gw.consume.ConsumeBatch(req, metadata=md)).messages
    assert [(m.message, m.deliveries) for m in second] == [(b"again", 2)]
    await asyncio.sleep(0.5)  # max_msg_deliveries=2: no third delivery
    req.batch_max_wait_time_ms = 300
    assert list((await gw.consume.ConsumeBatch(req, metadata=md)).messages) == []


async def test_start_positions(gw: Clients, token: str) -> None:
    st = name()
    assert (await gw.post(f"/stations/{st}/produce/batch", list(range(1, 6)), token=token))[0] == 200

    async def rest(group: str, **options: object) -> list[str]:
        status, body, _ = await gw.post(f"/stations/{st}/consume/batch", {
            "consumer_name": "p", "consumer_group": group, "batch_size": 10, "batch_max_wait_time_ms": 500,
            **options}, token=token)
        assert status == 200, body
        return [m["message"] for m in body]

    assert await rest("from-seq", start_consume_from_sequence=4) == ["4", "5"]
    assert await rest("last-two", last_messages=2) == ["4", "5"]
    assert await rest("all") == ["1", "2", "3", "4", "5"]
    md = bearer(await gw.grpc_token())
    got = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
        station=st, consumer_name="p", consumer_group="grpc-seq", batch_size=10, batch_max_wait_time_ms=500,
        start_consume_from_sequence=3), metadata=md)
    assert [m.message for m in got.messages] == [b"3", b"4", b"5"]
    status, body, _ = await gw.post(f"/stations/{st}/consume/batch", {
        "consumer_name": "p", "max_msg_deliveries": 11}, token=token)
    assert status == 400 and "max_msg_deliveries" in body["error"]


async def test_subscribe_with_metadata_grpc(gw: Clients) -> None:
    md = bearer(await gw.grpc_token())
    st = name()
    await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=st, body={"content_type": "text/plain", "data": b"s"}), metadata=md)
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(
        station=st, consumer_name="s", include_metadata=True, last_messages=1), metadata=md)
    reply = await asyncio.wait_for(call.read(), 5)
    call.cancel()
    assert [(m.message, m.sequence, m.partition, m.deliveries) for m in reply.messages] == [(b"s", 1, 1, 1)]


async def test_producer_name_per_request(gw: Clients, nats_server, token: str) -> None:
    st = name()
    status, body, _ = await gw.post(f"/stations/{st}/produce/single?producer_name=web-shop", raw=b"a", token=token,
                                    headers={"Content-Type": "text/plain"})
    assert status == 200, body
    assert (await gw.post(f"/stations/{st}/produce/batch", [1], token=token))[0] == 200
    md = bearer(await gw.grpc_token())
    await gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(
        station=st, producer_name="grpc-svc", messages=[{"data": b"c"}]), metadata=md)
    status, body, _ = await gw.post(f"/stations/{st}/produce/single?producer_name=bad%20name", raw=b"a",
                                    token=token, headers={"Content-Type": "text/plain"})
    assert status == 400 and "producer_name" in body["error"]
    nc = await connect_root(nats_server)
    try:
        js = nc.jetstream()
        names = [(await js.get_msg(stream_name(st, 1), seq)).headers["$memphis_producedBy"] for seq in (1, 2, 3)]
    finally:
        await nc.close()
    assert names == ["web-shop", "rest-gateway", "grpc-svc"]
