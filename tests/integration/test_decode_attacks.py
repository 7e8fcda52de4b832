"""Hostile payloads against consume's ``decode`` (REST batch and gRPC ConsumeBatch): each is answered with a
per-message ``decode_error`` and the message as stored, never a 500, never a decoded form built beyond the
answer's limit, never an answer the gRPC client can not parse."""

from __future__ import annotations

import json
import resource
import uuid
from typing import Any

from google.protobuf import json_format
from memgw.v1 import consume_pb2

from tests.harness import Clients, bearer

LONG_ENUM = "A" * 2000
AMPLIFY_PROTO = f"""syntax = "proto3";
package amp;
enum E {{ Z = 0; {LONG_ENUM} = 1; B = 2; }}
message M {{ repeated E e = 1; }}
"""
# a message named google.protobuf.Any is rendered by protobuf's JSON mapping as the well-known type
FAKE_ANY_PROTO = """syntax = "proto3";
package google.protobuf;
message W { Any a = 1; }
message Any { string type_url = 1; bytes value = 2; }
"""


def name(prefix: str = "dat") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def station_with(gw: Clients, token: str, kind: str, definition: str, payloads: list[bytes]) -> str:
    schema, station = name("sc"), name()
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": kind, "definition": definition}, token=token)
    assert status == 200, body
    assert (await gw.post("/stations", {"name": station}, token=token))[0] == 200
    assert (await gw.post(f"/stations/{station}/schema", {"name": schema}, token=token))[0] == 200
    content = "application/x-protobuf" if kind == "protobuf" else "application/json"
    for payload in payloads:
        status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=payload, token=token,
                                        headers={"Content-Type": content})
        assert status == 200, body
    return station


async def consume_both(gw: Clients, token: str, station: str, count: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """The station's messages decoded over REST and over gRPC (two groups)."""
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {
        "consumer_name": "c", "consumer_group": "rest", "batch_size": 10, "batch_max_wait_time_ms": 1000,
        "decode": True}, token=token)
    assert status == 200, body
    reply = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
        station=station, consumer_name="c", consumer_group="grpc", batch_size=10, batch_max_wait_time_ms=1000,
        decode=True), metadata=bearer(await gw.grpc_token()))
    assert len(body) == count and len(reply.messages) == count, (body, reply)
    return list(body), list(reply.messages)


async def test_a_few_bytes_naming_a_long_enum_value_are_not_decoded_into_megabytes(gw: Clients, token: str) -> None:
    # 50 KB: 50,000 repetitions of a 2,000-character enum name, 100 MB of JSON
    ones = b"\x01" * 50_000
    bomb = b"\x0a" + varint(len(ones)) + ones
    station = await station_with(gw, token, "protobuf", AMPLIFY_PROTO, [bomb, b"\x0a\x02\x00\x02"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rest, grpc_messages = await consume_both(gw, token, station, 2)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 60, f"decoding grew the gateway by {grown_mb:.0f} MB"
    assert "decoded" not in rest[0] and "too large" in rest[0]["decode_error"], rest[0]["decode_error"]
    assert rest[1]["decoded"] == {"e": ["Z", "B"]}
    assert not grpc_messages[0].HasField("decoded") and grpc_messages[0].message == bomb
    assert "too large" in grpc_messages[0].decode_error
    assert json_format.MessageToDict(grpc_messages[1].decoded) == {"e": ["Z", "B"]}


async def test_a_message_named_like_a_well_known_type_is_a_decode_error_not_a_500(gw: Clients, token: str) -> None:
    any_value = b"\x0a\x03foo\x12\x01x"  # type_url "foo": no such type
    payload = b"\x0a" + varint(len(any_value)) + any_value
    station = await station_with(gw, token, "protobuf", FAKE_ANY_PROTO, [payload])
    rest, grpc_messages = await consume_both(gw, token, station, 1)
    assert "decoded" not in rest[0] and "google.protobuf.Any" in rest[0]["decode_error"], rest
    assert grpc_messages[0].message == payload and "google.protobuf.Any" in grpc_messages[0].decode_error


async def test_deeply_nested_json_is_a_decode_error_the_grpc_client_can_read(gw: Clients, token: str) -> None:
    deep = json.dumps(json.loads('{"a":' * 40 + "1" + "}" * 40)).encode()  # a JSON schema accepts it
    shallow = b'{"a": {"b": [1, {"c": null}]}}'
    station = await station_with(gw, token, "json", '{"type": "object"}', [deep, shallow])
    rest, grpc_messages = await consume_both(gw, token, station, 2)
    assert "decoded" not in rest[0] and "nests deeper than" in rest[0]["decode_error"], rest[0]
    assert rest[1]["decoded"] == json.loads(shallow)
    assert grpc_messages[0].message == deep and "nests deeper than" in grpc_messages[0].decode_error
    assert json_format.MessageToDict(grpc_messages[1].decoded) == json.loads(shallow)
