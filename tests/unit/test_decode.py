"""Consume's decode (gateway.broker.sdk.decode_payload, gateway.broker.consume.decoded): protobuf by the
loaded schema message, JSON parsed, failures and oversized decoded forms as per-message decode_error."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from gateway.broker import consume
from gateway.broker.consume import decoded
from gateway.broker.sdk import decodable, decode_payload
from gateway.broker.seam import ConsumerSpec, InMessage
from gateway.core.errors import InvalidArgument


def memphis(kind: str, template: Any = None) -> Any:
    return SimpleNamespace(schema_updates_data={"st": {"type": kind} if kind else {}},
                           proto_msgs={"st": template} if template is not None else {})


def test_protobuf_decoded_with_the_loaded_message() -> None:
    m = memphis("protobuf", struct_pb2.Struct())  # any message class serves as the schema's message
    data = json_format.Parse('{"values": [1, "x"]}', struct_pb2.Struct()).SerializeToString()
    value, error, size = decode_payload(m, "st", data)
    assert error == "" and value is not None and size > 0
    assert json_format.MessageToDict(value) == {"values": [1, "x"]}
    value, error, _ = decode_payload(m, "st", b"\x0a\xff\xff")
    assert value is None and error.startswith("not a protobuf google.protobuf.Struct")
    value, error, _ = decode_payload(memphis("protobuf"), "st", data)
    assert value is None and "not loaded" in error


def test_json_parsed_and_other_kinds_refused() -> None:
    value, error, _ = decode_payload(memphis("json"), "st", b'{"a": [1, null]}')
    assert value is not None and json_format.MessageToDict(value) == {"a": [1, None]}
    value, error, _ = decode_payload(memphis("json"), "st", b"not json")
    assert value is None and error.startswith("not a JSON")
    decodable(memphis("json"), "st", "st")
    for kind, words in (("", "has no schema"), ("avro", "has a avro schema")):
        with pytest.raises(InvalidArgument) as info:
            decodable(memphis(kind), "st", "st")
        assert "decode needs a protobuf or JSON schema" in info.value.message and words in info.value.message


def test_a_decoded_form_too_large_comes_back_as_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    session: Any = SimpleNamespace(memphis=memphis("json"))
    spec = ConsumerSpec(station="st", consumer_name="c", group="g", decode=True)
    small = decoded(session, spec, InMessage(data=b'{"a": 1}', headers={}))
    assert small.data == b"" and small.decoded is not None and small.decode_error == ""
    # small numbers: 2 bytes each stored, about 11 as a protobuf Value
    big = b"[" + b"1," * 3000 + b"1]"
    assert decoded(session, spec, InMessage(data=big, headers={})).decoded is not None  # within 8 times
    monkeypatch.setattr(consume, "DECODE_GROWTH", 2)
    out = decoded(session, spec, InMessage(data=big, headers={}))
    assert out.data == big and out.decoded is None and "decode the message field yourself" in out.decode_error
    # the answer limit bounds a single message too
    limited = decoded(session, ConsumerSpec(station="st", consumer_name="c", group="g", decode=True, max_bytes=20),
                      InMessage(data=b'{"a": "0123456789012345678901"}', headers={}))
    assert limited.decoded is None and limited.decode_error


def test_a_decoded_form_past_the_limit_is_refused_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # google.protobuf.Struct's map of Values: a long key repeated in many small entries
    struct = struct_pb2.Struct()
    for i in range(200):
        struct.fields[f"{i:04d}" + "k" * 500].null_value = struct_pb2.NULL_VALUE
    data = struct.SerializeToString()
    m = memphis("protobuf", struct_pb2.Struct())
    built: list[int] = []
    real = json_format.MessageToDict
    monkeypatch.setattr(json_format, "MessageToDict", lambda *a, **k: built.append(1) or real(*a, **k))
    value, error, _ = decode_payload(m, "st", data, len(data) // 2)
    assert value is None and "too large" in error and not built
    value, error, size = decode_payload(m, "st", data, 8 * len(data))
    assert value is not None and error == "" and built and size > 0


async def test_large_batches_are_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    session: Any = SimpleNamespace(memphis=memphis("json"))
    spec = ConsumerSpec(station="st", consumer_name="c", group="g", decode=True)
    threads: list[str] = []
    real = consume.decoded
    monkeypatch.setattr(consume, "decoded",
                        lambda *a: threads.append(threading.current_thread().name) or real(*a))
    small = [InMessage(data=b'{"a": 1}', headers={})]
    large = [InMessage(data=b"[" + b"1," * consume.DECODE_INLINE_BYTES + b"1]", headers={})]
    assert (await consume.decoded_all(session, spec, small))[0].decoded is not None
    assert (await consume.decoded_all(session, spec, large))[0].decoded is not None
    assert threads[0] == threading.current_thread().name and threads[1] != threads[0]
