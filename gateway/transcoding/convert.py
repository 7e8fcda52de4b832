"""Text values (path captures, query values) converted by field type (grpc-gateway's ``convert.go``).

A mismatch is a ValueError; the callers turn it into InvalidArgument
``type mismatch, parameter: x, error: ...`` (path) or ``invalid query parameter`` (query).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.core.errors import InvalidArgument
from gateway.transcoding import wkt
from gateway.transcoding.jsoncodec import assign, codec_for
from gateway.transcoding.jsonscalars import INT_RANGES, decode_base64

_F = FieldDescriptor
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NaN|[+-]?Inf(?:inity)?")


def parse_text(fd: FieldDescriptor, text: str) -> Any:
    """One textual value converted for field ``fd`` (its element type if repeated); ValueError."""
    t = fd.type
    if t == _F.TYPE_STRING:
        return text
    if t in INT_RANGES:
        if not _INT.fullmatch(text):
            raise ValueError(f"invalid integer {text!r}")
        n = int(text)
        lo, hi, _ = INT_RANGES[t]
        if not lo <= n <= hi:
            raise ValueError(f"{text} is out of range")
        return n
    if t == _F.TYPE_BOOL:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"invalid boolean {text!r}")
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        if not _FLOAT.fullmatch(text):
            raise ValueError(f"invalid number {text!r}")
        return float(text.replace("Infinity", "inf").replace("Inf", "inf"))
    if t == _F.TYPE_ENUM:
        value = fd.enum_type.values_by_name.get(text)
        if value is not None:
            return value.number
        if _INT.fullmatch(text) and -(2**31) <= int(text) < 2**31:
            return int(text)
        raise ValueError(f"invalid value {text!r} for enum {fd.enum_type.full_name}")
    if t == _F.TYPE_BYTES:
        try:
            return decode_base64(text, fd.name)
        except InvalidArgument:
            raise ValueError("invalid base64") from None
    if fd.message_type is not None:
        return _parse_message_text(fd.message_type, text)
    raise ValueError(f"unsupported field type {t}")


def _parse_message_text(desc: Descriptor, text: str) -> Message:
    msg = codec_for(desc).message_class()
    name = desc.full_name
    try:
        if name in wkt.TEXT:
            json_format.Parse(orjson.dumps(text), msg)
        elif name in wkt.JSON_VALUES:
            json_format.Parse(text, msg)
        elif name in wkt.WRAPPERS:
            msg.value = parse_text(desc.fields_by_name["value"], text)
        else:
            raise ValueError(f"a {name} cannot be given as text")
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    return msg


def text_message(desc: Descriptor) -> bool:
    """Whether a message type has a textual form (Timestamp, Duration, wrappers, ...)."""
    return wkt.has_text_form(desc.full_name)


def resolve_path(desc: Descriptor, path: str) -> tuple[FieldDescriptor, ...] | None:
    """Resolve a dotted field path (proto or lowerCamel names); None if a name is unknown.

    ValueError when the path goes through something other than a singular message.
    """
    out: list[FieldDescriptor] = []
    parts = path.split(".")
    for i, part in enumerate(parts):
        fc = codec_for(desc).by_key.get(part)
        if fc is None:
            return None
        out.append(fc.field)
        if i < len(parts) - 1:
            fd = fc.field
            if fd.message_type is None or fd.is_repeated:
                raise ValueError(f"{'.'.join(f.name for f in out)} is not a message")
            desc = fd.message_type
    return tuple(out)


def is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def target(msg: Message, path: Sequence[FieldDescriptor]) -> Message:
    for fd in path[:-1]:
        msg = getattr(msg, fd.name)
    return msg


def set_text(msg: Message, path: Sequence[FieldDescriptor], values: Sequence[str]) -> None:
    """Set the leaf of ``path`` from text values (many only for repeated fields); ValueError."""
    leaf = path[-1]
    owner = target(msg, path)
    if leaf.is_repeated:
        assign(owner, leaf, [parse_text(leaf, v) for v in values])
        return
    if len(values) != 1:
        raise ValueError("too many values")
    oneof = leaf.containing_oneof
    if oneof is not None and len(oneof.fields) > 1:
        chosen = owner.WhichOneof(oneof.name)
        if chosen is not None and chosen != leaf.name:
            raise ValueError(f"field {chosen!r} of the same oneof is already set")
    assign(owner, leaf, parse_text(leaf, values[0]))


def leaf_is_set(msg: Message, path: Sequence[FieldDescriptor]) -> bool:
    for fd in path[:-1]:
        if not msg.HasField(fd.name):
            return False
        msg = getattr(msg, fd.name)
    leaf = path[-1]
    return codec_for(msg.DESCRIPTOR).is_set(msg, leaf.name)
