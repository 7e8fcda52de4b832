"""Consumers asking for messages as JSON (``decode``): protobuf stations' messages decoded by the
station's schema, JSON stations' payloads parsed; a message that does not decode comes back as
stored with ``decode_error``; a station without such a schema is a 400. REST (batch, NDJSON
stream, SSE) and gRPC (ConsumeBatch, Subscribe, ConsumeEvents)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from memgw.v1 import consume_pb2

from tests.harness import Clients, bearer
from tests.integration.test_schemas import ORDER_PROTO, order_class
from tests.integration.test_sse import read_events

BAD_PROTOBUF = b"\x0a\xff\xff"  # a truncated field: not a shop.Order
NEEDS_A = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})


def name(prefix: str = "dec") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def protobuf_station(gw: Clients, token: str) -> tuple[str, Any]:
    """A station with messages [undecodable, Order as bytes, Order from JSON]; its Order class.

    The undecodable one is produced before the schema is attached (the gateway refuses it after)."""
    schema, station = name("sc"), name()
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "protobuf", "definition": ORDER_PROTO},
                                    token=token)
    assert status == 200, body
    order = order_class(body["schema"]["active_version"]["descriptor"], "Order")
    assert (await gw.post("/stations", {"name": station}, token=token))[0] == 200
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=BAD_PROTOBUF, token=token,
                                    headers={"Content-Type": "application/x-protobuf"})
    assert status == 200, body
    assert (await gw.post(f"/stations/{station}/schema", {"name": schema}, token=token))[0] == 200
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", token=token,
                                    raw=order(id=300, item="tea", tags=["x"]).SerializeToString(),
                                    headers={"Content-Type": "application/x-protobuf"})
    assert status == 200, body
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", {"id": 7, "item": "cake"}, token=token)
    assert status == 200, body
    return station, order


EXPECTED = [{"id": "300", "item": "tea", "tags": ["x"]}, {"id": "7", "item": "cake"}]  # int64: strings


def check_rest(messages: list[dict[str, Any]]) -> None:
    assert len(messages) == 3, messages
    bad, *good = messages
    assert "decoded" not in bad and bad["message"] and \
        bad["decode_error"].startswith("not a protobuf shop.Order"), bad
    assert [m["decoded"] for m in good] == EXPECTED
    assert all(m["message"] == "" and "decode_error" not in m for m in good), good


async def test_decode_protobuf_rest(gw: Clients, token: str) -> None:
    station, _ = await protobuf_station(gw, token)
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "consumer_group": "batch", "batch_size": 10, "batch_max_wait_time_ms": 1000,
        "decode": True, "include_metadata": True}, token=token)
    assert status == 200, body
    check_rest(body)
    assert [m["sequence"] for m in body] == [1, 2, 3]
    # without decode: as stored
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "consumer_group": "raw", "batch_size": 10, "batch_max_wait_time_ms": 1000}, token=token)
    assert status == 200 and len(body) == 3 and all("decoded" not in m and "decode_error" not in m for m in body)
    # the NDJSON stream
    async with gw.http.post(f"{gw.base}/stations/{station}/consume/stream",
                            json={"consumer_name": "c", "consumer_group": "ndjson", "decode": True},
                            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while len(got) < 3:
                line = await resp.content.readline()
                if line.strip():
                    got += json.loads(line)["result"]["messages"]
    check_rest(got)
    # server-sent events
    url = (f"{gw.base}/stations/{station}/consume/sse?consumer_name=web&consumer_group=sse&decode=true"
           f"&authorization={token}")
    async with gw.http.get(url) as resp:
        assert resp.status == 200
        events = await read_events(resp, 3)
    check_rest([e["data"] for e in events if "data" in e])


async def test_decode_protobuf_grpc(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    station, _ = await protobuf_station(gw, token)

    def check(messages: Any) -> None:
        assert len(messages) == 3
        bad, *good = messages
        assert not bad.HasField("decoded") and bad.message == BAD_PROTOBUF
        assert bad.decode_error.startswith("not a protobuf shop.Order")
        assert [json_format.MessageToDict(m.decoded) for m in good] == EXPECTED
        assert all(m.message == b"" and not m.HasField("decode_error") for m in good)

    batch = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
        station=station, consumer_name="c", consumer_group="grpc-batch", batch_size=10, batch_max_wait_time_ms=1000,
        decode=True), metadata=md)
    check(batch.messages)
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(
        station=station, consumer_name="c", consumer_group="grpc-sub", decode=True), metadata=md)
    got: list[Any] = []
    async with asyncio.timeout(5):
        while len(got) < 3:
            got += (await call.read()).messages
    call.cancel()
    check(got)
    call = gw.consume.ConsumeEvents(consume_pb2.ConsumeEventsRequest(
        station=station, consumer_name="c", consumer_group="grpc-events", decode=True), metadata=md)
    async with asyncio.timeout(5):
        events = [await call.read() for _ in range(4)]
    call.cancel()
    check([e.message for e in events[1:]])


async def test_decode_json_station_and_refusals(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    schema, station = name("sc"), name()
    assert (await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_A}, token=token))[0] == 200
    # before the schema: no schema, decode refused (before anything is consumed)
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"not json", token=token,
                                    headers={"Content-Type": "text/plain"})
    assert status == 200, body
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "batch_max_wait_time_ms": 100, "decode": True}, token=token)
    assert status == 400 and "decode needs a protobuf or JSON schema" in body["error"] and \
        "has no schema" in body["error"], body
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
            station=station, consumer_name="c", batch_max_wait_time_ms=100, decode=True), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode needs" in info.value.details()
    # with the JSON schema: payloads parsed; the earlier text one comes back as stored
    assert (await gw.post(f"/stations/{station}/schema", {"name": schema}, token=token))[0] == 200
    assert (await gw.post(f"/stations/{station}/produce/single", {"a": 1, "n": [1, 2]}, token=token))[0] == 200

    async def consumed() -> list[dict[str, Any]]:
        status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
            "consumer_name": "c", "consumer_group": "json", "batch_size": 10, "batch_max_wait_time_ms": 1000,
            "decode": True}, token=token)
        assert status == 200, body
        return list(body)

    body = await consumed()
    if not body:  # the schema push reaches the consumer connection asynchronously
        body = await consumed()
    assert [m.get("decoded") for m in body] == [None, {"a": 1, "n": [1, 2]}], body
    assert body[0]["message"] == "not json" and body[0]["decode_error"].startswith("not a JSON"), body
