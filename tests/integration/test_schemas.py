"""Schemas over REST and gRPC: versions, attachment, live producers, protobuf compiled from .proto text,
JSON converted to protobuf on produce, and memphis-py validating against what the gateway compiled."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from memgw.v1 import produce_pb2, schemas_pb2, schemas_pb2_grpc
from memphis import Memphis
from memphis.exceptions import MemphisSchemaError

from gateway.broker.sdk import parse_descriptor
from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer

ORDER_PROTO = """syntax = "proto3";
package shop;

message Order {
  int64 id = 1;
  string item = 2;
  repeated string tags = 3;
}

message Other {
  bool flag = 1;
}
"""

NEEDS_A = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
NEEDS_B = json.dumps({"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]})


def name(prefix: str = "sc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def delete(gw: Clients, path: str, token: str) -> tuple[int, Any]:
    async with gw.http.delete(gw.base + path, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, json.loads(await resp.read())


def stub(gw: Clients) -> schemas_pb2_grpc.SchemaServiceStub:
    return schemas_pb2_grpc.SchemaServiceStub(gw.channel)


async def produce_json(gw: Clients, station: str, body: Any, token: str) -> tuple[int, Any]:
    status, reply, _ = await gw.post(f"/stations/{station}/produce/single", body, token=token)
    return status, reply


async def eventually(check: Any, seconds: float = 5.0) -> Any:
    """Poll ``check`` (an async callable answering a truthy value when done) up to ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.1)


async def test_schema_lifecycle_rest(gw: Clients, token: str) -> None:
    schema, station = name(), name("st")
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_A}, token=token)
    assert status == 200, body
    assert body["created"] is True and body["schema"]["name"] == schema and body["schema"]["type"] == "json"
    assert body["schema"]["active_version"]["version_number"] == 1
    assert body["schema"]["active_version"]["definition"] == NEEDS_A
    assert body["schema"]["active_version"]["created_by"] == ROOT_USER
    # the same definition again: no new version
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_A}, token=token)
    assert status == 200 and body["created"] is False and body["schema"]["active_version"]["version_number"] == 1
    # another definition: version 2
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_B}, token=token)
    assert status == 200 and body["created"] is True and body["schema"]["active_version"]["version_number"] == 2
    # another type under the same name: 400
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "avro", "definition": '"string"'},
                                    token=token)
    assert status == 400 and "already exists with type json" in body["error"]

    status, body, _ = await gw.get("/schemas", token=token)
    assert status == 200 and schema in [s["name"] for s in body["schemas"]]
    status, body, _ = await gw.get(f"/schemas/{schema}", token=token)
    assert status == 200 and [v["version_number"] for v in body["versions"]] == [1, 2]
    assert body["versions"][0]["definition"] == NEEDS_A and body["stations"] == []
    assert body["versions"][0]["created_at"].endswith("Z")

    # attach: the station enforces version 2
    status, body, _ = await gw.post("/stations", {"name": station}, token=token)
    assert status == 200, body
    status, body, _ = await gw.post(f"/stations/{station}/schema", {"name": schema}, token=token)
    assert (status, body) == (200, {"error": None, "success": True})
    status, body, _ = await gw.get(f"/stations/{station}", token=token)
    assert body["station"]["schema_name"] == schema
    assert (await produce_json(gw, station, {"b": 1}, token))[0] == 200
    status, body = await produce_json(gw, station, {"a": 1}, token)
    assert status == 400 and "'b' is a required property" in body["error"], body
    status, body, _ = await gw.get(f"/schemas/{schema}", token=token)
    assert body["stations"] == [station]

    # an attached schema cannot be deleted
    status, body = await delete(gw, f"/schemas/{schema}", token)
    assert status == 409 and station in body["error"] and "detach" in body["error"], body
    assert (await delete(gw, f"/stations/{station}/schema", token)) == (200, {"error": None, "success": True})
    # no schema any more: live producers learn it from the control plane's push (asynchronous)

    async def unchecked() -> bool:
        return (await produce_json(gw, station, {"a": 1}, token))[0] == 200

    assert await eventually(unchecked)
    assert (await delete(gw, f"/schemas/{schema}", token)) == (200, {"error": None, "success": True})
    status, body, _ = await gw.get(f"/schemas/{schema}", token=token)
    assert (status, body) == (404, {"error": f"Schema {schema} does not exist", "success": False})
    assert (await delete(gw, f"/schemas/{schema}", token))[0] == 404
    await delete(gw, f"/stations/{station}", token)


async def test_bad_schema_requests_rest(gw: Clients, token: str) -> None:
    for bad, word in (({"name": name(), "type": "xml", "definition": "<a/>"}, "schema type not supported"),
                      ({"name": name(), "type": "json", "definition": "{not json"}, "invalid json schema"),
                      ({"name": name(), "type": "json"}, "definition is required"),
                      ({"type": "json", "definition": "{}"}, "name is required"),
                      ({"name": "Bad Name!", "type": "json", "definition": "{}"}, "name"),
                      ({"name": name(), "type": "graphql", "definition": "type {"}, "invalid graphql schema"),
                      ({"name": name(), "type": "json", "definition": "x" * 300_000}, "too large")):
        status, body, _ = await gw.post("/schemas", bad, token=token)
        assert status == 400, (bad, status, body)
        assert word in body["error"], (bad, body)
    status, body, _ = await gw.post("/stations/nope-station/schema", {"name": "nope-schema"}, token=token)
    assert status == 404 and "Schema nope-schema does not exist" in body["error"]
    status, body, _ = await gw.get("/schemas", token=None)
    assert status == 401


async def test_schemas_grpc(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    schema, station = name(), name("st")
    reply = await stub(gw).CreateSchema(schemas_pb2.CreateSchemaRequest(name=schema, type="json",
                                                                         definition=NEEDS_A), metadata=md)
    assert reply.success and reply.created and reply.schema.active_version.version_number == 1
    reply = await stub(gw).CreateSchema(schemas_pb2.CreateSchemaRequest(name=schema, type="json",
                                                                         definition=NEEDS_B), metadata=md)
    assert reply.schema.active_version.version_number == 2
    listed = await stub(gw).ListSchemas(schemas_pb2.ListSchemasRequest(), metadata=md)
    assert schema in [s.name for s in listed.schemas]
    got = await stub(gw).GetSchema(schemas_pb2.GetSchemaRequest(name=schema), metadata=md)
    assert [v.version_number for v in got.versions] == [1, 2]
    await gw.post("/stations", {"name": station}, token=token)
    await stub(gw).AttachSchema(schemas_pb2.AttachSchemaRequest(station=station, name=schema), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, body={"content_type": "application/json", "data": b'{"a": 1}'}), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'b' is a required" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(gw).DeleteSchema(schemas_pb2.DeleteSchemaRequest(name=schema), metadata=md)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await stub(gw).DetachSchema(schemas_pb2.DetachSchemaRequest(station=station), metadata=md)
    await stub(gw).DeleteSchema(schemas_pb2.DeleteSchemaRequest(name=schema), metadata=md)
    for call in (stub(gw).GetSchema(schemas_pb2.GetSchemaRequest(name=schema), metadata=md),
                 stub(gw).DeleteSchema(schemas_pb2.DeleteSchemaRequest(name=schema), metadata=md)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(gw).CreateSchema(schemas_pb2.CreateSchemaRequest(name=name(), type="protobuf",
                                                                     definition="message {"), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid protobuf schema" in info.value.details()
    await delete(gw, f"/stations/{station}", token)


async def test_a_new_version_reaches_a_live_gateway_producer(gw: Clients, token: str) -> None:
    schema, station = name(), name("st")
    await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_A}, token=token)
    await gw.post("/stations", {"name": station, "schema_name": schema}, token=token)
    assert (await produce_json(gw, station, {"a": 1}, token))[0] == 200  # the gateway's producer is live now
    status, _, _ = await gw.post("/schemas", {"name": schema, "type": "json", "definition": NEEDS_B}, token=token)
    assert status == 200

    async def refused() -> bool:
        return (await produce_json(gw, station, {"a": 2}, token))[0] == 400

    assert await eventually(refused), "version 2 never reached the gateway's producer"
    assert (await produce_json(gw, station, {"b": 1}, token))[0] == 200


def order_class(descriptor: str, struct: str) -> Any:
    desc_set = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(descriptor))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(desc_set.file[0])
    return GetMessageClass(pool.FindMessageTypeByName(f"{desc_set.file[0].package}.{struct}"))


async def test_protobuf_schema_compiled_and_validated_rest(gw: Clients, token: str) -> None:
    schema, station = name(), name("st")
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "protobuf", "definition": ORDER_PROTO},
                                    token=token)
    assert status == 200, body
    active = body["schema"]["active_version"]
    assert active["message_struct_name"] == "Order" and active["descriptor"]
    Order = order_class(active["descriptor"], "Order")
    # message_struct_name picks another message; an unknown one is refused
    status, body, _ = await gw.post("/schemas", {"name": name(), "type": "protobuf", "definition": ORDER_PROTO,
                                                 "message_struct_name": "Other"}, token=token)
    assert status == 200 and body["schema"]["active_version"]["message_struct_name"] == "Other"
    for bad, word in (({"definition": ORDER_PROTO, "message_struct_name": "Nope"}, "no top-level message 'Nope'"),
                      ({"definition": 'syntax = "proto3";\nmessage A { int32 x = 1 }'}, "schema.proto:2"),
                      ({"definition": 'syntax = "proto3";\nimport "google/protobuf/any.proto";\nmessage A {}'},
                       "imports are not supported"),
                      ({"definition": 'syntax = "proto3";\nenum E { E_ZERO = 0; }'}, "defines no message")):
        status, body, _ = await gw.post("/schemas", {"name": name(), "type": "protobuf", **bad}, token=token)
        assert status == 400 and word in body["error"], (bad, body)
        assert "/tmp" not in body["error"]

    await gw.post("/stations", {"name": station, "schema_name": schema}, token=token)
    # protobuf bytes: checked as they are (bytes that are not UTF-8 too: memphis-py's B12)
    good = Order(id=300, item="tea", tags=["x"]).SerializeToString()
    assert not good.isascii()
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=good, token=token,
                                    headers={"Content-Type": "application/x-protobuf"})
    assert status == 200, body
    status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"\x0a\xff\xff", token=token,
                                    headers={"Content-Type": "application/x-protobuf"})
    assert status == 400 and "expecting protobuf shop.Order" in body["error"], body
    # JSON converted to the message (protobuf-native producers)
    assert (await produce_json(gw, station, {"id": "7", "item": "cake", "tags": ["a", "b"]}, token))[0] == 200
    status, body = await produce_json(gw, station, {"id": 1, "price": 3}, token)
    assert status == 400 and '"price"' in body["error"] and "shop.Order" in body["error"], body
    status, body = await produce_json(gw, station, {"id": "seven"}, token)
    assert status == 400 and "id" in body["error"], body
    status, body, _ = await gw.post(f"/stations/{station}/produce/batch", [{"id": 8}, {"nope": 1}], token=token)
    assert status == 400 and body["sent"] == 1 and body["fail"] == 1, body

    status, body, _ = await gw.post(f"/stations/{station}/consume/batch",
                                    {"consumer_name": "c", "batch_size": 10, "batch_max_wait_time_ms": 500},
                                    token=token)
    assert status == 200
    assert len(body) == 3
    converted = Order.FromString(body[1]["message"].encode())  # the JSON one, stored as protobuf
    assert (converted.id, converted.item, list(converted.tags)) == (7, "cake", ["a", "b"])
    await delete(gw, f"/stations/{station}", token)


async def test_protobuf_json_produce_grpc(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    schema, station = name(), name("st")
    await stub(gw).CreateSchema(schemas_pb2.CreateSchemaRequest(name=schema, type="protobuf",
                                                                 definition=ORDER_PROTO), metadata=md)
    await gw.post("/stations", {"name": station}, token=token)
    await stub(gw).AttachSchema(schemas_pb2.AttachSchemaRequest(station=station, name=schema), metadata=md)
    await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=station, body={"content_type": "application/json", "data": b'{"id": 5, "item": "x"}'}), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, body={"content_type": "application/json", "data": b'{"idd": 5}'}), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and '"idd"' in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, body={"content_type": "application/x-protobuf", "data": b"\x0a\xff"}), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await delete(gw, f"/stations/{station}", token)


async def test_memphis_py_validates_against_the_compiled_protobuf(gw: Clients, token: str, nats_server) -> None:
    schema, station = name(), name("st")
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "protobuf", "definition": ORDER_PROTO},
                                    token=token)
    assert status == 200, body
    Order = order_class(body["schema"]["active_version"]["descriptor"], "Order")
    await gw.post("/stations", {"name": station}, token=token)
    await gw.post(f"/stations/{station}/schema", {"name": schema}, token=token)
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    m.parse_descriptor = lambda st, m=m: parse_descriptor(m, st)  # protobuf >= 6 (docs/memphis-py.md B9)
    try:
        producer = await m.producer(station_name=station, producer_name="sdk-pb", timeout_retries=0)
        await producer.produce(Order(id=1, item="ok"))  # a message object
        await producer.produce(bytearray(Order(id=2, item="ok").SerializeToString()))  # its bytes (ASCII ones)
        with pytest.raises(MemphisSchemaError):  # truncated (UTF-8: memphis-py's refusal decodes it, B12)
            await producer.produce(bytearray(b"\x0a\x05ab"))
    finally:
        await m.close()
    status, body, _ = await gw.get(f"/stations/{station}", token=token)
    assert body["total_messages"] == 2
    await delete(gw, f"/stations/{station}", token)
