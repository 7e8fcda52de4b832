"""Dead letters over REST and gRPC: a message nacked max_msg_deliveries times lands in the station's
dead-letter store with its group and delivery count, and is resent; schema refusals (memphis-py's and the
gateway's own) too."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest
from memgw.v1 import deadletters_pb2, deadletters_pb2_grpc
from memphis import Memphis
from memphis.exceptions import MemphisSchemaError

from gateway.embedded import deadletters
from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer


def name() -> str:
    return f"dl-{uuid.uuid4().hex[:8]}"


async def delete(gw: Clients, path: str, token: str) -> tuple[int, Any]:
    async with gw.http.delete(gw.base + path, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, json.loads(await resp.read())


async def dead_letters(gw: Clients, station: str, token: str, want: int, seconds: float = 5.0) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        status, body, _ = await gw.get(f"/stations/{station}/dls", token=token)
        assert status == 200, body
        if len(body["dead_letters"]) >= want or asyncio.get_running_loop().time() > deadline:
            return list(body["dead_letters"])
        await asyncio.sleep(0.1)


async def nack_until_dead(gw: Clients, station: str, token: str, group: str, deliveries: int,
                          last_messages: int = -1) -> None:
    for _ in range(deliveries):
        status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
            "consumer_name": "c", "consumer_group": group, "batch_size": 10, "batch_max_wait_time_ms": 2000,
            "ack_mode": "ACK_MODE_EXPLICIT", "max_msg_deliveries": deliveries, "last_messages": last_messages},
            token=token)
        assert status == 200 and len(body) == 1, body
        status, reply, _ = await gw.post(f"/stations/{station}/ack", {"ack_ids": [body[0]["ack_id"]], "nack": True},
                                         token=token)
        assert status == 200, reply
    # JetStream gives up (and advises) when the group next asks for messages
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "consumer_group": group, "batch_size": 10, "batch_max_wait_time_ms": 300,
        "ack_mode": "ACK_MODE_EXPLICIT"}, token=token)
    assert status == 200 and body == [], body


async def test_poison_message_in_the_dls_and_resent_rest(gw: Clients, token: str) -> None:
    station = name()
    assert (await gw.post("/stations", {"name": station}, token=token))[0] == 200
    status, _, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"poison", token=token,
                                 headers={"Content-Type": "text/plain", "X-Kind": "bad"})
    assert status == 200
    await nack_until_dead(gw, station, token, "g1", 2)
    [letter] = await dead_letters(gw, station, token, 1)
    assert letter["reason"] == "poison" and letter["message"] == "poison"
    assert letter["consumer_group"] == "g1-rest-gateway" and letter["deliveries"] == 2
    assert letter["partition"] == 1 and letter["sequence"] == 1 and letter["headers"]["X-Kind"] == "bad"
    assert letter["timestamp"].endswith("Z")

    status, body, _ = await gw.post(f"/stations/{station}/dls/resend", {"ids": [letter["id"], 999999]}, token=token)
    assert status == 200 and body["resent"] == 1 and body["missing"] == [999999], body
    assert await dead_letters(gw, station, token, 0, seconds=0) == []
    # back in the station: a new group reads the original and the resent copy
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "consumer_group": "g2", "batch_size": 10, "batch_max_wait_time_ms": 1000}, token=token)
    assert [m["message"] for m in body] == ["poison", "poison"] and body[1]["headers"]["X-Kind"] == "bad"

    # purge (another station's dead letters stay)
    other = name()
    await gw.post(f"/stations/{other}/produce/single", raw=b"again", token=token,
                  headers={"Content-Type": "text/plain"})
    await nack_until_dead(gw, other, token, "g3", 1)
    assert len(await dead_letters(gw, other, token, 1)) == 1
    await gw.post(f"/stations/{station}/produce/single", raw=b"third", token=token,
                  headers={"Content-Type": "text/plain"})
    await nack_until_dead(gw, station, token, "g4", 1, last_messages=1)
    assert len(await dead_letters(gw, station, token, 1)) == 1
    assert await delete(gw, f"/stations/{other}/dls", token) == (200, {"error": None, "success": True})
    assert await dead_letters(gw, other, token, 0, seconds=0) == []
    assert len(await dead_letters(gw, station, token, 1, seconds=0)) == 1
    await delete(gw, f"/stations/{other}", token)

    status, body, _ = await gw.get("/stations/nope-dl/dls", token=token)
    assert status == 404
    status, body, _ = await gw.post(f"/stations/{station}/dls/resend", {"ids": []}, token=token)
    assert status == 400 and "ids is required" in body["error"]
    await delete(gw, f"/stations/{station}", token)


async def test_poison_off_keeps_no_dead_letter(gw: Clients, token: str) -> None:
    station = name()
    await gw.post("/stations", {"name": station, "dls": {"poison": False}}, token=token)
    await gw.post(f"/stations/{station}/produce/single", raw=b"x", token=token, headers={"Content-Type": "text/plain"})
    await nack_until_dead(gw, station, token, "g", 1)
    assert await dead_letters(gw, station, token, 1, seconds=1.0) == []
    await delete(gw, f"/stations/{station}", token)


async def test_dead_letters_grpc(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    stub = deadletters_pb2_grpc.DeadLetterServiceStub(gw.channel)
    station = name()
    await gw.post("/stations", {"name": station}, token=token)
    await gw.post(f"/stations/{station}/produce/single", raw=b"p", token=token, headers={"Content-Type": "text/plain"})
    await nack_until_dead(gw, station, token, "g", 1)
    await dead_letters(gw, station, token, 1)
    listed = await stub.ListDeadLetters(deadletters_pb2.ListDeadLettersRequest(station=station), metadata=md)
    [letter] = listed.dead_letters
    assert letter.data == b"p" and letter.reason == "poison" and letter.deliveries == 1
    reply = await stub.ResendDeadLetters(deadletters_pb2.ResendDeadLettersRequest(station=station, ids=[letter.id]),
                                         metadata=md)
    assert reply.resent == 1 and not reply.missing
    await stub.PurgeDeadLetters(deadletters_pb2.PurgeDeadLettersRequest(station=station), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListDeadLetters(deadletters_pb2.ListDeadLettersRequest(station="nope-dl"), metadata=md)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await delete(gw, f"/stations/{station}", token)


async def test_memphis_py_schema_refusal_in_the_dls(gw: Clients, token: str, nats_server) -> None:
    station, schema = name(), name()
    definition = json.dumps({"type": "object", "required": ["a"]})
    await gw.post("/schemas", {"name": schema, "type": "json", "definition": definition}, token=token)
    await gw.post("/stations", {"name": station, "schema_name": schema}, token=token)
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    try:
        producer = await m.producer(station_name=station, producer_name="sdk-dl", timeout_retries=0)
        with pytest.raises(MemphisSchemaError):
            await producer.produce(bytearray(b'{"b": 1}'))
    finally:
        await m.close()
    [letter] = await dead_letters(gw, station, token, 1)
    assert letter["reason"] == "schema" and letter["message"] == '{"b": 1}' and letter["producer_name"] == "sdk-dl"
    assert "'a' is a required property" in letter["validation_error"]
    await delete(gw, f"/stations/{station}", token)


# -- the gateway's own schema refusals ---------------------------------------------------------------

NEEDS_A = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})


async def schema_station(gw: Clients, token: str, **dls: bool) -> str:
    station, schema = name(), name()
    assert (await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_A}, token=token))[0] == 200
    body: dict[str, Any] = {"name": station, "schema_name": schema}
    if dls:
        body["dls"] = dls
    assert (await gw.post("/stations", body, token=token))[0] == 200
    return station


async def test_gateway_schema_refusal_in_the_dls_rest(gw: Clients, token: str) -> None:
    station = await schema_station(gw, token)  # dls.schemaverse: on by default, as in Memphis
    status, body, _ = await gw.post(f"/stations/{station}/produce/single?producer_name=web-form", {"b": 1},
                                    token=token, headers={"X-Source": "form"})
    assert status == 400 and "'a' is a required property" in body["error"], body
    status, body, _ = await gw.post(f"/stations/{station}/produce/batch", [{"a": 1}, {"a": "x"}], token=token)
    assert status == 400 and body["sent"] == 1 and body["fail"] == 1, body
    letters = await dead_letters(gw, station, token, 2)
    # (a batch's elements are stored as compact JSON)
    assert [(d["reason"], d["message"]) for d in letters] == [("schema", '{"b": 1}'), ("schema", '{"a":"x"}')]
    first, second = letters
    assert first["producer_name"] == "web-form" and second["producer_name"] == "rest-gateway"
    assert "'a' is a required property" in first["validation_error"] and "'x' is not of type" in \
        second["validation_error"], letters
    assert first["headers"]["X-Source"] == "form"
    # resent: back in the station (the store bypasses the schema, as for SDK refusals); dropped
    status, body, _ = await gw.post(f"/stations/{station}/dls/resend", {"ids": [first["id"]]}, token=token)
    assert status == 200 and body["resent"] == 1, body
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "batch_size": 10, "batch_max_wait_time_ms": 1000}, token=token)
    assert [m["message"] for m in body] == ['{"a":1}', '{"b": 1}'], body
    assert await delete(gw, f"/stations/{station}/dls", token) == (200, {"error": None, "success": True})
    assert await dead_letters(gw, station, token, 0, seconds=0) == []
    await delete(gw, f"/stations/{station}", token)


async def test_gateway_schema_refusal_in_the_dls_grpc(gw: Clients, token: str) -> None:
    from memgw.v1 import produce_pb2

    md = bearer(await gw.grpc_token())
    stub = deadletters_pb2_grpc.DeadLetterServiceStub(gw.channel)
    station = await schema_station(gw, token)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, body={"content_type": "application/json", "data": b'{"z": 2}'},
            producer_name="grpc-svc"), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await dead_letters(gw, station, token, 1)
    [letter] = (await stub.ListDeadLetters(deadletters_pb2.ListDeadLettersRequest(station=station),
                                           metadata=md)).dead_letters
    assert (letter.reason, letter.data, letter.producer_name) == ("schema", b'{"z": 2}', "grpc-svc")
    assert "'a' is a required property" in letter.validation_error
    reply = await stub.ResendDeadLetters(deadletters_pb2.ResendDeadLettersRequest(station=station, ids=[letter.id]),
                                         metadata=md)
    assert reply.resent == 1
    assert (await stub.ListDeadLetters(deadletters_pb2.ListDeadLettersRequest(station=station),
                                       metadata=md)).dead_letters == []
    await delete(gw, f"/stations/{station}", token)


async def test_gateway_schema_refusal_not_kept_with_schemaverse_off(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    from memgw.v1 import produce_pb2

    station = await schema_station(gw, token, schemaverse=False)
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", {"b": 1}, token=token)
    assert status == 400, body
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, body={"content_type": "application/json", "data": b'{"z": 2}'}), metadata=md)
    assert await dead_letters(gw, station, token, 1, seconds=1.0) == []
    await delete(gw, f"/stations/{station}", token)


async def test_the_store_is_bounded_and_a_store_made_before_the_bounds_gets_them(gw: Clients, nats_server) -> None:
    from tests.conftest import connect_root

    nc = await connect_root(nats_server, name="tests::dls-bounds")
    try:
        js = nc.jetstream()
        info = await js.stream_info(deadletters.STREAM)
        assert (info.config.max_msgs_per_subject, info.config.max_bytes) == (
            deadletters.MAX_PER_STATION, deadletters.MAX_STORE_BYTES)
        info.config.max_msgs_per_subject, info.config.max_bytes = -1, -1  # as stores were made before
        await js.update_stream(info.config)
        store = deadletters.DeadLetters(gw.gateway.control_plane.catalog, queue="tests-dls")  # type: ignore[union-attr]
        await store.open(nc)
        await store.close()
        info = await js.stream_info(deadletters.STREAM)
        assert (info.config.max_msgs_per_subject, info.config.max_bytes) == (
            deadletters.MAX_PER_STATION, deadletters.MAX_STORE_BYTES)
    finally:
        await nc.close()


async def test_a_refusal_report_can_not_pose_as_the_store_or_add_header_lines(gw: Clients, token: str,
                                                                             nats_server) -> None:
    """Any client may publish on $memphis_schemaverse_dls (memphis-py does): what it reports is stored as data,
    never as the store's own Memgw-Dls-* fields, broker headers or extra header lines."""
    import nats

    station = await schema_station(gw, token)
    # a REST producer's own header named like the store's
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", {"b": 1}, token=token,
                                    headers={"Memgw-Dls-Partition": "5", "memgw-dls-group": "spoof", "X-Ok": "1"})
    assert status == 400, body
    nc = await nats.connect(nats_server.url, user=ROOT_USER, password=ROOT_PASSWORD)
    try:
        await nc.publish(deadletters.SCHEMAVERSE_DLS, json.dumps({
            "station_name": station,
            "producer": {"name": "p\r\nMemgw-Dls-Group: spoof", "connection_id": "x"},
            "message": {"data": b"raw".hex(), "headers": {
                "X-Ok": "2", "Memgw-Dls-Sequence": "99", "Nats-Msg-Id": "dup", "Nats-Expected-Stream": "other",
                "X-Inj": "a\r\nMemgw-Dls-Deliveries: 9", "Bad Name": "v", "Status": "503"}},
            "validation_error": "bad\r\nMemgw-Dls-Partition: 3\r\n\r\n"}).encode())
        await nc.flush()
    finally:
        await nc.close()
    letters = await dead_letters(gw, station, token, 2)
    assert len(letters) == 2, letters
    for letter, ok in zip(letters, ("1", "2"), strict=True):
        assert letter["reason"] == "schema" and letter["headers"]["X-Ok"] == ok, letter
        assert not [k for k in letter["headers"] if k.lower().startswith(("memgw-dls-", "nats-"))], letter
        assert not letter.get("consumer_group") and not letter.get("partition") and not letter.get("sequence")
        assert not letter.get("deliveries"), letter
    assert letters[1]["headers"] == {"X-Ok": "2"}
    assert letters[1]["message"] == "raw" and letters[1]["producer_name"] == "p  Memgw-Dls-Group: spoof"
    assert letters[1]["validation_error"].startswith("bad  Memgw-Dls-Partition: 3")
    listed = await deadletters_pb2_grpc.DeadLetterServiceStub(gw.channel).ListDeadLetters(
        deadletters_pb2.ListDeadLettersRequest(station=station), metadata=bearer(await gw.grpc_token()))
    got = [(d.partition, d.consumer_group, d.headers["X-Ok"]) for d in listed.dead_letters]
    assert got == [(0, "", "1"), (0, "", "2")]
    await delete(gw, f"/stations/{station}", token)


async def test_a_batch_of_refused_messages_is_answered_promptly_and_stored_bounded(gw: Clients, token: str) -> None:
    station = await schema_station(gw, token)
    start = asyncio.get_running_loop().time()
    status, body, _ = await gw.post(f"/stations/{station}/produce/batch", [{"b": i} for i in range(1000)], token=token)
    took = asyncio.get_running_loop().time() - start
    assert status == 400 and body["fail"] == 1000 and body["sent"] == 0, body
    assert took < 3, f"1000 refusals took {took:.1f} s"
    letters = await dead_letters(gw, station, token, 1000, seconds=10)
    assert len(letters) == 1000 and all(d["reason"] == "schema" for d in letters)
    await delete(gw, f"/stations/{station}", token)
