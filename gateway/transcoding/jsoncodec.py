"""JSON <-> protobuf, compiled once per message type.

A :class:`MessageCodec` is built the first time a descriptor is seen (see
:func:`codec_for`) and holds one small converter per field, so a request or
response costs a loop over precomputed tuples, never a descriptor walk.

Decoding is strict, unlike protojson: an integer field takes a JSON integer only
(not ``"1"``, ``true`` or ``1.5``), strings take strings, bools bools, messages
objects, repeated fields arrays, maps objects; enums take a name or a number. Keys
may be proto names or lowerCamel JSON names; unknown keys are ignored; ``null``
leaves a field unset. Errors are :class:`JsonDecodeError` (an InvalidArgument)
naming the field, e.g. ``account_id: expected a number, got a string``.

Encoding follows the REST contract (docs/rest-api.md), not protojson: proto field names,
every field without presence emitted (defaults included), ``optional`` and message
fields only when set, 64-bit integers as JSON numbers, enums as names,
``google.protobuf.NullValue`` as ``null``, bytes as base64 except fields marked
``(memgw.v1.json_text) = true``, which are UTF-8 text. Well-known types
(Timestamp, Duration, Struct, Value, ...) go through ``json_format``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from gateway.core import jsonbytes
from gateway.core.jsondepth import MAX_JSON_DEPTH, too_deep
from gateway.transcoding import wkt
from gateway.transcoding.jsonscalars import (
    INT_RANGES,
    Decoder,
    Encoder,
    JsonDecodeError,
    fail,
    int_decoder,
    json_type,
    scalar_decoder,
    scalar_encoder,
)

__all__ = ["INT_RANGES", "INVALID_JSON", "FieldCodec", "JsonDecodeError", "MessageCodec", "codec_for", "dumps", "loads"]

INVALID_JSON = "Invalid request body"


# ---------------------------------------------------------------- scalars


# ---------------------------------------------------------------- messages


def _wkt_codec(desc: Descriptor) -> tuple[Encoder, Decoder]:
    cls = GetMessageClass(desc)
    if desc.full_name in wkt.WRAPPERS:
        inner = desc.fields_by_name["value"]
        enc, dec = scalar_encoder(inner), scalar_decoder(inner)
        if enc is None:
            return (lambda m: m.value), (lambda v, path: cls(value=dec(v, path)))
        return (lambda m: enc(m.value)), (lambda v, path: cls(value=dec(v, path)))

    def decode(v: Any, path: str) -> Message:
        msg = cls()
        try:
            json_format.ParseDict(v, msg)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise JsonDecodeError(f"{path}: invalid {desc.full_name}: {exc}") from None
        return msg

    return (lambda m: json_format.MessageToDict(m, preserving_proto_field_name=True)), decode


_F = FieldDescriptor


class FieldCodec:
    """How one field goes to and from JSON."""

    __slots__ = ("accepts_null", "decode", "encode", "field", "json_name", "name", "presence")

    encode: Encoder | None  # None: the Python value is already JSON
    decode: Decoder

    def __init__(self, field: FieldDescriptor) -> None:
        self.field = field
        self.name: str = field.name
        self.json_name: str = field.json_name
        self.presence = bool(field.has_presence)
        value_field = field
        map_entry = field.message_type is not None and field.message_type.GetOptions().map_entry
        if map_entry:
            value_field = field.message_type.fields_by_name["value"]
        enc, dec = _value_codec(value_field)
        self.accepts_null = not field.is_repeated and _accepts_null(field)
        if map_entry:
            key_dec = _map_key_decoder(field.message_type.fields_by_name["key"])
            str_keys = field.message_type.fields_by_name["key"].type == _F.TYPE_STRING
            self.encode = _map_encoder(enc, str_keys)
            self.decode = _map_decoder(key_dec, dec)
        elif field.is_repeated:
            self.encode = list if enc is None else (lambda v: [enc(x) for x in v])
            self.decode = _list_decoder(dec)
        else:
            self.encode = enc
            self.decode = dec


def _accepts_null(field: FieldDescriptor) -> bool:
    if field.enum_type is not None and field.enum_type.full_name == wkt.NULL_VALUE:
        return True
    return field.message_type is not None and field.message_type.full_name == "google.protobuf.Value"


def _value_codec(field: FieldDescriptor) -> tuple[Encoder | None, Decoder]:
    desc = field.message_type
    if desc is None:
        return scalar_encoder(field), scalar_decoder(field)
    if desc.full_name in wkt.WRAPPERS or desc.full_name in wkt.JSON_FORMAT:
        return _wkt_codec(desc)

    resolved: list[MessageCodec] = []  # resolved on first use: types may be recursive

    def codec() -> MessageCodec:
        if not resolved:
            resolved.append(codec_for(desc))
        return resolved[0]

    def encode(m: Message) -> Any:
        return (resolved[0] if resolved else codec()).to_obj(m)

    def decode(v: Any, path: str) -> Message:
        return (resolved[0] if resolved else codec()).decode(v, path)

    return encode, decode


def _list_decoder(dec: Decoder) -> Decoder:
    def decode(v: Any, path: str) -> list[Any]:
        if type(v) is not list:
            raise fail(path, "an array", v)
        return [dec(x, f"{path}[{i}]") for i, x in enumerate(v)]

    return decode


def _map_key_decoder(key: FieldDescriptor) -> Callable[[str, str], Any]:
    if key.type == _F.TYPE_STRING:
        return lambda k, path: k
    if key.type == _F.TYPE_BOOL:

        def bool_key(k: str, path: str) -> bool:
            if k not in ("true", "false"):
                raise JsonDecodeError(f"{path}: map key {k!r} is not a boolean")
            return k == "true"

        return bool_key
    ints = int_decoder(key.type)

    def int_key(k: str, path: str) -> int:
        try:
            n = int(k, 10)
        except ValueError:
            raise JsonDecodeError(f"{path}: map key {k!r} is not an integer") from None
        return ints(n, path)  # type: ignore[no-any-return]

    return int_key


def _map_decoder(key_dec: Callable[[str, str], Any], value_dec: Decoder) -> Decoder:
    def decode(v: Any, path: str) -> dict[Any, Any]:
        if type(v) is not dict:
            raise fail(path, "an object", v)
        return {key_dec(k, path): value_dec(x, f"{path}[{k}]") for k, x in v.items()}

    return decode


def _map_encoder(enc: Encoder | None, str_keys: bool) -> Encoder:
    if str_keys:
        if enc is None:
            return lambda v: {k: v[k] for k in v}  # faster than dict(v) on a upb map
        return lambda v: {k: enc(x) for k, x in v.items()}
    if enc is None:
        return lambda v: {_key_text(k): x for k, x in v.items()}
    return lambda v: {_key_text(k): enc(x) for k, x in v.items()}


def _key_text(k: Any) -> str:
    return ("true" if k else "false") if type(k) is bool else str(k)


class MessageCodec:
    """The JSON codec of one message type; get it with :func:`codec_for`."""

    def __init__(self, desc: Descriptor) -> None:
        self.descriptor = desc
        self.message_class: type[Message] = GetMessageClass(desc)
        _CACHE[desc] = self  # before the fields, so recursive types resolve
        self.fields: dict[str, FieldCodec] = {f.name: FieldCodec(f) for f in desc.fields}
        # Lookup by proto name and lowerCamel JSON name.
        self.by_key: dict[str, FieldCodec] = {}
        for fc in self.fields.values():
            self.by_key[fc.json_name] = fc
            self.by_key[fc.name] = fc
        self._oneofs = tuple(frozenset(f.name for f in o.fields) for o in desc.oneofs if len(o.fields) > 1)
        self._encode_plan = tuple((fc.name, fc.encode, fc.presence) for fc in self.fields.values())
        self._defaults = {f.name: f.default_value for f in desc.fields if not f.is_repeated and f.message_type is None}

    # ------------------------------------------------------------ decode

    def decode(self, obj: Any, path: str = "") -> Message:
        """A message from parsed JSON (``orjson.loads`` output)."""
        kwargs = self.decode_fields(obj, path)
        try:
            return self.message_class(**kwargs)
        except (ValueError, TypeError) as exc:  # e.g. a string with a lone surrogate
            raise JsonDecodeError(f"{path or INVALID_JSON}: {exc}") from None

    def decode_fields(self, obj: Any, path: str = "") -> dict[str, Any]:
        """Constructor keyword arguments from a parsed JSON object."""
        if type(obj) is not dict:
            if not path:
                raise JsonDecodeError(f"{INVALID_JSON}: expected a JSON object, got {json_type(obj)}")
            raise fail(path, "an object", obj)
        out: dict[str, Any] = {}
        by_key = self.by_key
        prefix = f"{path}." if path else ""
        for key, value in obj.items():
            fc = by_key.get(key)
            if fc is None or (value is None and not fc.accepts_null):
                continue
            out[fc.name] = fc.decode(value, prefix + fc.name)
        for names in self._oneofs:
            chosen = names.intersection(out)
            if len(chosen) > 1:
                raise JsonDecodeError(f"{prefix}{'/'.join(sorted(chosen))}: more than one field of a oneof is set")
        return out

    def loads(self, data: bytes | str) -> Message:
        """A message from JSON text; empty text is the empty message."""
        if not data:
            return self.message_class()
        return self.decode(loads(data))

    def merge_field(self, msg: Message, name: str, value: Any, path: str | None = None) -> None:
        """Decode a JSON value into field ``name`` of ``msg``."""
        fc = self.fields[name]
        if value is None and not fc.accepts_null:
            return
        assign(msg, fc.field, fc.decode(value, name if path is None else path))

    def is_set(self, msg: Message, name: str) -> bool:
        """Whether field ``name`` holds anything (presence, non-empty or non-default)."""
        fc = self.fields[name]
        if fc.presence:
            return bool(msg.HasField(name))
        value = getattr(msg, name)
        if fc.field.is_repeated:
            return len(value) > 0
        return bool(value != self._defaults[name])

    # ------------------------------------------------------------ encode

    def to_obj(self, msg: Message) -> dict[str, Any]:
        """The JSON-ready dict of ``msg`` (see the module docstring for the rules)."""
        out: dict[str, Any] = {}
        for name, enc, presence in self._encode_plan:
            if presence and not msg.HasField(name):
                continue
            value = getattr(msg, name)
            out[name] = value if enc is None else enc(value)
        return out

    def field_to_obj(self, msg: Message, name: str) -> Any:
        """The JSON-ready value of one field (for ``response_body``)."""
        fc = self.fields[name]
        value = getattr(msg, name)
        return value if fc.encode is None else fc.encode(value)

    def dumps(self, msg: Message) -> bytes:
        return jsonbytes.dumps(self.to_obj(msg))


def assign(msg: Message, field: FieldDescriptor, value: Any) -> None:
    """Set a decoded value on ``msg``: replace scalars/messages, extend lists, update maps."""
    name = field.name
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        target = getattr(msg, name)
        if field.message_type.fields_by_name["value"].message_type is None:
            target.update(value)
        else:
            for k, v in value.items():
                target[k].CopyFrom(v)
    elif field.is_repeated:
        getattr(msg, name).extend(value)
    elif field.message_type is not None:
        getattr(msg, name).CopyFrom(value)
    else:
        setattr(msg, name, value)


_CACHE: dict[Descriptor, MessageCodec] = {}


def codec_for(message: Descriptor | type[Message] | Message) -> MessageCodec:
    """The (cached) codec of a message type, by descriptor, class or instance."""
    desc: Descriptor = message if isinstance(message, Descriptor) else message.DESCRIPTOR
    codec = _CACHE.get(desc)
    return MessageCodec(desc) if codec is None else codec


def loads(data: bytes | str) -> Any:
    """Parse JSON; anything unparsable is JsonDecodeError("Invalid request body")."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if too_deep(exc.msg):
            raise JsonDecodeError(f"{INVALID_JSON}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        raise JsonDecodeError(INVALID_JSON) from None


def dumps(msg: Message) -> bytes:
    """Encode any message with its cached codec."""
    return codec_for(msg.DESCRIPTOR).dumps(msg)
