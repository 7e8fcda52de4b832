"""JSON text the gateway holds is held at its own size (orjson 3.12+ returns over-allocated buffers)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from google.protobuf import struct_pb2

from gateway.core import jsonbytes
from gateway.servicers.produce import json_elements
from gateway.transcoding.jsoncodec import codec_for


def held(make: Callable[[], Any]) -> tuple[Any, int]:
    """What ``make()`` returns and the bytes still allocated for it."""
    tracemalloc.start()
    try:
        result = make()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, current


def test_text_is_held_at_its_size() -> None:
    for value in ({}, {"a": "x" * 100}, {"a": "x" * 5000}, [{"k": i} for i in range(2000)]):
        texts, size = held(lambda value=value: [jsonbytes.dumps(value) for _ in range(100)])
        assert size < 100 * (len(texts[0]) + 100), (len(texts[0]), size / 100)


def test_a_batch_of_5000_tiny_messages_holds_kilobytes() -> None:
    """orjson.dumps per element held 20 MB for this 15 KB body (orjson 3.13)."""
    body = b"[" + b",".join([b"{}"] * 5000) + b"]"
    elements, size = held(lambda: json_elements(body, 5000))
    assert len(elements) == 5000
    assert size < 400_000, size


def test_an_answer_is_held_at_its_size() -> None:
    msg = struct_pb2.ListValue(values=[struct_pb2.Value(string_value="x" * 3000) for _ in range(20)])
    codec = codec_for(msg.DESCRIPTOR)
    codec.dumps(msg)  # the codec's own caches are made
    text, size = held(lambda: codec.dumps(msg))
    assert len(text) > 60_000
    assert size < len(text) + 1000, (len(text), size)
