"""JSON <-> protobuf (gateway.transcoding.jsoncodec): strict decoding, the REST contract's encoding, speed."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memgw.v1 import auth_pb2, consume_pb2, monitoring_pb2, produce_pb2

from gateway.core.errors import InvalidArgument
from gateway.transcoding.jsoncodec import INVALID_JSON, JsonDecodeError, codec_for, dumps
from tests.unit.test_httprules import message_class

Echo = message_class("EchoRequest")


def encode(msg: Any) -> Any:
    return orjson.loads(dumps(msg))


# ---------------------------------------------------------------- encoding


def test_null_value_and_defaults_match_api_md() -> None:
    assert dumps(produce_pb2.ProduceSingleResponse(success=True)) == b'{"error":null,"success":true}'
    assert dumps(produce_pb2.ProduceBatchResponse()) == b'{"error":null,"success":false}'


def test_64_bit_integers_are_numbers() -> None:
    msg = auth_pb2.AuthenticateResponse(
        expires_in=900000, jwt="a", jwt_refresh_token="r", refresh_token_expires_in=18000000
    )
    assert dumps(msg) == (
        b'{"expires_in":900000,"jwt":"a","jwt_refresh_token":"r","refresh_token_expires_in":18000000}'
    )
    assert encode(Echo(u64=2**64 - 1))["u64"] == 2**64 - 1


def test_batch_failure_shape() -> None:
    detail = produce_pb2.ProduceBatchFailure(errors=["a", "b"], fail=2, sent=1)
    assert encode(detail) == {"errors": ["a", "b"], "fail": 2, "sent": 1, "success": False}


def test_json_text_bytes_and_optional_fields() -> None:
    msg = consume_pb2.ConsumedMessage(message=b'{"message": "x"}', headers={"Content-Type": "application/json"})
    assert encode(msg) == {"message": '{"message": "x"}', "headers": {"Content-Type": "application/json"}}
    msg.ack_id = "a1"
    assert encode(msg)["ack_id"] == "a1"
    assert encode(consume_pb2.ConsumedMessage(message=b"\xffok"))["message"] == "\ufffdok"


def test_field_to_obj_for_response_body() -> None:
    codec = codec_for(consume_pb2.ConsumeBatchResponse)
    reply = consume_pb2.ConsumeBatchResponse(messages=[consume_pb2.ConsumedMessage(message=b"1")])
    assert codec.field_to_obj(reply, "messages") == [{"message": "1", "headers": {}}]
    assert codec.field_to_obj(consume_pb2.ConsumeBatchResponse(), "messages") == []


def test_every_kind_of_field() -> None:
    Inner = message_class("Inner")
    msg = Echo(
        id="i", n32=-1, ratio=0.5, color=2, blob=b"hi", text=b"plain", tags=["a"], labels={"k": "v"},
        by_num={3: Inner(name="n")}, flags={True: "yes"}, maybe="m", b=7, f32=math.inf,
    )  # fmt: skip
    msg.when.seconds = 1
    msg.span.seconds = 2
    msg.wrapped.value = 5
    msg.extra["x"] = 1
    msg.any_value.string_value = "s"
    out = encode(msg)
    assert out["id"] == "i" and out["n32"] == -1 and out["ratio"] == 0.5
    assert out["color"] == "GREEN" and out["blob"] == "aGk=" and out["text"] == "plain"
    assert out["tags"] == ["a"] and out["labels"] == {"k": "v"} and out["flags"] == {"true": "yes"}
    assert out["by_num"] == {"3": {"name": "n", "big": 0, "tags": [], "color": "COLOR_UNSPECIFIED"}}
    assert out["maybe"] == "m" and out["b"] == 7 and "a" not in out
    assert out["when"] == "1970-01-01T00:00:01Z" and out["span"] == "2s"
    assert out["wrapped"] == 5 and out["extra"] == {"x": 1.0} and out["any_value"] == "s"
    assert out["nothing"] is None and out["f32"] == "Infinity"
    assert "inner" not in out  # unset messages are left out
    assert out["u64"] == 0 and out["flag"] is False and out["nums"] == []  # defaults are emitted


def test_unknown_enum_number_is_emitted_as_number() -> None:
    assert encode(Echo(color=42))["color"] == 42


# ---------------------------------------------------------------- decoding


DECODE_OK: list[tuple[bytes, dict[str, Any]]] = [
    (b"", {}),
    (b"{}", {}),
    (b'{"id": "x", "n32": -5, "u64": 18446744073709551615}', {"id": "x", "n32": -5, "u64": 2**64 - 1}),
    (b'{"ratio": 1, "f32": 2.5, "flag": true}', {"ratio": 1.0, "f32": 2.5, "flag": True}),
    (b'{"ratio": "NaN"}', {}),
    (b'{"color": "RED"}', {"color": 1}),
    (b'{"color": 2}', {"color": 2}),
    (b'{"blob": "aGk="}', {"blob": b"hi"}),
    (b'{"blob": "aGk"}', {"blob": b"hi"}),
    (b'{"text": "caf\\u00e9"}', {"text": "café".encode()}),
    (b'{"tags": ["a", "b"], "nums": [1, 2]}', {"tags": ["a", "b"], "nums": [1, 2]}),
    (b'{"labels": {"k": "v"}}', {"labels": {"k": "v"}}),
    (b'{"byNum": {"7": {"name": "n"}}}', {}),
    (b'{"flags": {"true": "t"}}', {"flags": {True: "t"}}),
    (b'{"inner": {"name": "n", "big": 9007199254740993}}', {}),
    (b'{"anyValue": null, "nothing": null}', {}),
    (b'{"id": null, "inner": null}', {}),
    (b'{"maybe": ""}', {"maybe": ""}),
    (b'{"a": "x"}', {"a": "x"}),
    (b'{"when": "2024-01-01T00:00:00Z", "span": "3s", "wrapped": 4}', {}),
    (b'{"extra": {"k": [1, "two", null]}}', {}),
    (b'{"unknownKey": 1, "another": {"x": []}}', {}),
]


@pytest.mark.parametrize(("body", "expected"), DECODE_OK)
def test_decode(body: bytes, expected: dict[str, Any]) -> None:
    msg = codec_for(Echo).loads(body)
    for name, value in expected.items():
        got = getattr(msg, name)
        if isinstance(value, list):
            got = list(got)
        elif isinstance(value, dict):
            got = dict(got)
        assert got == value, name


def test_decode_details() -> None:
    msg = codec_for(Echo).loads(
        b'{"byNum": {"7": {"name": "n"}}, "inner": {"name": "n", "big": 9007199254740993},'
        b' "anyValue": null, "when": "2024-01-01T00:00:00Z", "span": "3s", "wrapped": 4, "maybe": ""}'
    )
    assert msg.by_num[7].name == "n" and msg.inner.big == 9007199254740993
    assert msg.HasField("any_value") and msg.any_value.WhichOneof("kind") == "null_value"
    assert msg.when.seconds == 1704067200 and msg.span.seconds == 3 and msg.wrapped.value == 4
    assert msg.HasField("maybe")
    assert not codec_for(Echo).loads(b'{"maybe": null}').HasField("maybe")
    assert math.isnan(codec_for(Echo).loads(b'{"ratio": "NaN"}').ratio)


DECODE_BAD = [
    (b"nope", INVALID_JSON),
    (b"{", INVALID_JSON),
    (b" ", INVALID_JSON),
    (b"\xff", INVALID_JSON),
    (b"[1]", "Invalid request body: expected a JSON object, got an array"),
    (b'"x"', "Invalid request body: expected a JSON object, got a string"),
    (b'{"n32": "1"}', "n32: expected a number, got a string"),
    (b'{"n32": true}', "n32: expected a number, got a boolean"),
    (b'{"n32": 1.5}', "n32: expected an integer, got 1.5"),
    (b'{"n32": 1.0}', "n32: expected an integer, got 1.0"),
    (b'{"n32": 2147483648}', "n32: 2147483648 is out of range for int32"),
    (b'{"u64": -1}', "u64: -1 is out of range for uint64"),
    (b'{"id": 5}', "id: expected a string, got a number"),
    (b'{"flag": "true"}', "flag: expected a boolean, got a string"),
    (b'{"flag": 1}', "flag: expected a boolean, got a number"),
    (b'{"ratio": "1.5"}', "ratio: expected a number, got a string"),
    (b'{"color": "PURPLE"}', "color: unknown value 'PURPLE' for enum memgw.testing.v1.Color"),
    (b'{"color": true}', "color: expected one of"),
    (b'{"blob": "!!"}', "blob: invalid base64"),
    (b'{"blob": 5}', "blob: expected a base64 string, got a number"),
    (b'{"inner": "x"}', "inner: expected an object, got a string"),
    (b'{"inner": {"big": "5"}}', "inner.big: expected a number, got a string"),
    (b'{"tags": "a"}', "tags: expected an array, got a string"),
    (b'{"tags": ["a", 1]}', "tags[1]: expected a string, got a number"),
    (b'{"tags": [null]}', "tags[0]: expected a string, got null"),
    (b'{"inners": [{}, {"name": 1}]}', "inners[1].name: expected a string, got a number"),
    (b'{"labels": ["a"]}', "labels: expected an object, got an array"),
    (b'{"labels": {"k": 1}}', "labels[k]: expected a string, got a number"),
    (b'{"byNum": {"x": {}}}', "by_num: map key 'x' is not an integer"),
    (b'{"flags": {"yes": "t"}}', "flags: map key 'yes' is not a boolean"),
    (b'{"a": "x", "b": 1}', "a/b: more than one field of a oneof is set"),
    (b'{"when": "yesterday"}', "when: invalid google.protobuf.Timestamp"),
    (b'{"wrapped": "4"}', "wrapped: expected a number, got a string"),
    (b'{"nothing": 1}', "nothing: expected null, got a number"),
]


@pytest.mark.parametrize(("body", "message"), DECODE_BAD)
def test_decode_errors_name_the_field(body: bytes, message: str) -> None:
    with pytest.raises(JsonDecodeError) as info:
        codec_for(Echo).loads(body)
    assert info.value.message.startswith(message), info.value.message
    assert isinstance(info.value, InvalidArgument) and info.value.http_status == 400


def test_api_md_account_id_as_string() -> None:
    with pytest.raises(JsonDecodeError) as info:
        codec_for(auth_pb2.AuthenticateRequest).loads(b'{"username": "u", "account_id": "1"}')
    assert info.value.message == "account_id: expected a number, got a string"
    req = codec_for(auth_pb2.AuthenticateRequest).loads(b'{"username": "u", "accountId": 3, "tokenExpiryInMinutes": 5}')
    assert req.account_id == 3 and req.token_expiry_in_minutes == 5


def test_merge_field_and_is_set() -> None:
    codec = codec_for(Echo)
    msg = Echo()
    codec.merge_field(msg, "labels", {"a": "1"})
    codec.merge_field(msg, "labels", {"b": "2"})
    codec.merge_field(msg, "inner", {"name": "x"})
    assert dict(msg.labels) == {"a": "1", "b": "2"} and msg.inner.name == "x"
    assert codec.is_set(msg, "labels") and codec.is_set(msg, "inner") and not codec.is_set(msg, "id")
    assert not codec.is_set(msg, "maybe")
    msg.maybe = ""
    assert codec.is_set(msg, "maybe")


def test_roundtrip_contract_messages() -> None:
    for msg in (
        consume_pb2.ConsumeBatchRequest(station="s", consumer_name="c", batch_size=0, ack_mode=1),
        monitoring_pb2.GetResourcesUtilizationResponse(cpu=1.5, memory=2.0, storage=2**40),
        produce_pb2.ProduceStreamRequest(
            station="s", messages=[produce_pb2.ProducedMessage(data=b"\x00", headers={"a": "b"})]
        ),
    ):
        assert codec_for(type(msg)).loads(dumps(msg)) == msg


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_KEYS = st.sampled_from([f.name for f in Echo.DESCRIPTOR.fields] + [f.json_name for f in Echo.DESCRIPTOR.fields])


@settings(max_examples=300)
@given(st.dictionaries(_KEYS, _JSON, max_size=4))
def test_random_objects_decode_or_fail_with_invalid_argument(obj: dict[str, Any]) -> None:
    try:
        codec_for(Echo).decode(obj)
    except JsonDecodeError as exc:
        assert exc.message


@given(st.binary(max_size=40))
def test_random_bytes_decode_or_fail_with_invalid_argument(data: bytes) -> None:
    try:
        codec_for(Echo).loads(data)
    except JsonDecodeError:
        pass
