"""memphis-py behind one module: its calls bounded by our deadline, its errors as ours, its bugs patched.

memphis-py 1.3.1 is archived upstream; docs/memphis-py.md numbers the bugs worked around here
and elsewhere in this package:

- host "localhost" sleeps 1-2 s in connect: rewritten to 127.0.0.1 (``natsutil.parse_servers``);
- nats-py's default error callback logs tracebacks on every reconnect: replaced (``Session.watch``);
- ``m.producer()`` / ``m.consumer()`` are unlocked and ``consumer()`` is uncached: one lock and one
  long-lived object per (user, station[, group]) (``Session.once``);
- B3: idempotency keys go out as Nats-Msg-Id (stock nats-server) and msg-id (``publisher.encode_headers``);
- B5: payloads go to validators as bytearray (:func:`validated`);
- B6: schema validators are rebuilt when the station's schema push changes (``Producing._schema``);
- B7: ``close()`` leaks consumer tasks: cancelled in :func:`close_session`;
- B9: protobuf schemas use GetMessageClass instead of the removed GetPrototype (:func:`parse_descriptor`);
- B12: memphis-py refuses protobuf payloads that are not UTF-8: checked here instead (:func:`protobuf_payload`);
  consumers asking for JSON get messages decoded with the same loaded schema (:func:`decode_payload`);
- the gateway's own schema refusals are reported to the dead-letter store as memphis-py reports its
  own (:func:`refusal_report`, docs/memphis-py.md "$memphis_schemaverse_dls");
- B13: a password login with TLS deep-copies its SSLContext and fails: the context is shared (:func:`tls_safe`);
- ``fetch()`` ignores its wait time (5 s fixed): the gateway fetches from the subscriptions (``consume``).

memphis-py reports every failure as ``MemphisError`` with a text only, so :func:`sdk_call` is the
one place that reads those texts.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import ssl
import time
from collections.abc import Mapping
from typing import Any

import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, struct_pb2
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from memphis import Memphis
from memphis.exceptions import MemphisError, MemphisSchemaError
from memphis.station import Station

from gateway.broker.natsutil import RETRY_AFTER_S
from gateway.core.deadlines import timeout
from gateway.core.errors import InvalidArgument, ResourceExhausted, Unavailable

_UNREACHABLE_WORDS = ("timeout", "no responders", "connection")


async def sdk_call(call: Any, seconds: float) -> Any:
    """Await a memphis-py creation call with our deadline and our error types."""
    try:
        async with timeout(seconds):
            return await call
    except TimeoutError:
        raise Unavailable(f"broker unavailable: no answer within {seconds:g} s", retry_after=RETRY_AFTER_S) from None
    except MemphisError as exc:
        text = str(exc)
        if any(word in text.lower() for word in _UNREACHABLE_WORDS):
            raise Unavailable(f"broker unavailable: {text}", retry_after=RETRY_AFTER_S) from None
        if "station quota reached" in text:  # the control plane's (gateway.embedded.catalog)
            raise ResourceExhausted(text.removeprefix("memphis: ")) from None
        raise InvalidArgument(text) from None


async def validated(m: Memphis, station: str, data: bytes) -> bytes | bytearray:
    """``data`` checked against the station's schema (InvalidArgument with the reason if it fails)."""
    try:
        checked: bytes | bytearray = await Station(m, station).validate_msg(bytearray(data))  # B5
        return checked
    except MemphisSchemaError as exc:
        raise InvalidArgument(schema_error(str(exc))) from None
    except Exception as exc:
        raise InvalidArgument(schema_error(f"Schema validation has failed: {exc}")) from None


def schema_error(text: str) -> str:
    """memphis-py's text without its "memphis: " prefix and jsonschema's schema dump."""
    text = text.removeprefix("memphis: ").strip()
    return text.split("\n", 1)[0].strip()


class _SharedContext(ssl.SSLContext):
    """An SSLContext that ``copy.deepcopy`` shares instead of trying to pickle (B13)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContext:
        return self


def tls_safe(m: Memphis) -> Memphis:
    """``m`` able to log in with a password over TLS (docs/memphis-py.md B13): its connect deep-copies the
    nats options, SSLContext included, for the ping connection of a password login, which raises
    ``cannot pickle 'SSLContext' object``; the context becomes one that deepcopy shares."""
    original = m.get_broker_manager_connection

    async def get_broker_manager_connection(connection_opts: dict[str, Any]) -> Any:
        ctx = connection_opts.get("tls")
        if type(ctx) is ssl.SSLContext:
            ctx.__class__ = _SharedContext  # same layout, one method more
        return await original(connection_opts)

    m.get_broker_manager_connection = get_broker_manager_connection
    return m


async def abandon(m: Memphis) -> None:
    """Close what a failed or timed-out memphis-py connect left open."""
    nc = getattr(m, "broker_manager", None)
    if nc is not None:
        with contextlib.suppress(Exception):
            await nc.close()


def parse_descriptor(m: Memphis, station: str) -> None:
    """memphis-py's parse_descriptor with protobuf >= 6's GetMessageClass (B9)."""
    active = m.schema_updates_data[station]["active_version"]
    desc_set = descriptor_pb2.FileDescriptorSet()
    desc_set.ParseFromString(base64.b64decode(active["descriptor"]))
    pool = descriptor_pool.DescriptorPool()
    for file in desc_set.file:
        pool.Add(file)
    package = desc_set.file[0].package
    name = f"{package}.{active['message_struct_name']}" if package else active["message_struct_name"]
    m.proto_msgs[station] = GetMessageClass(pool.FindMessageTypeByName(name))()


def protobuf_payload(m: Memphis, key: str, data: bytes, is_json: bool) -> bytes:
    """``data`` for a protobuf-schema station: JSON text converted to the schema's message, protobuf
    bytes checked to parse as it; InvalidArgument naming what is wrong.

    Not memphis-py's validate_msg: it refuses valid messages whose bytes are not UTF-8 (B12)."""
    template = m.proto_msgs.get(key)
    if template is None:
        raise InvalidArgument("Schema validation has failed: the station's protobuf schema is not loaded yet, retry")
    message = type(template)()
    kind = message.DESCRIPTOR.full_name
    if is_json:
        try:
            json_format.Parse(data, message)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"Schema validation has failed: not a {kind}: {schema_error(str(exc))}") from None
        except ValueError as exc:  # not UTF-8, too deep
            raise InvalidArgument(f"Schema validation has failed: not a {kind}: {exc}") from None
        return bytes(message.SerializeToString())
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"Schema validation has failed: Invalid message format, expecting protobuf {kind} "
                              f"({exc})") from None
    return data


DECODABLE = ("protobuf", "json")


def decodable(m: Memphis, key: str, station: str) -> None:
    """InvalidArgument unless the station's schema (as pushed to this connection) can decode messages."""
    schema = m.schema_updates_data.get(key) or {}
    kind = schema.get("type", "")
    if kind not in DECODABLE:
        has = f"a {kind} schema" if kind else "no schema"
        raise InvalidArgument(f"decode needs a protobuf or JSON schema on the station; station {station} has {has}: "
                              "consume without decode")


# A decoded value nests at most this many JSON levels: each is two or three protobuf levels of
# google.protobuf.Value, and protobuf parsers (gRPC clients') stop at 100.
DECODE_MAX_DEPTH = 30
_NUMBER_BOUND = 26  # the longest JSON a number field renders to ("-9223372036854775808" quoted, "-Infinity", ...)
_WKT_BOUND = 48  # the longest JSON a Timestamp or Duration renders to


class _Undecodable(Exception):
    """Why a message is not decoded (its text is the decode_error)."""


class _TooLarge(_Undecodable):
    """The decoded form would pass the limit (the text says by how much)."""


def decode_payload(
    m: Memphis, key: str, data: bytes, limit: int = 0
) -> tuple[struct_pb2.Value | None, str, int]:
    """(the payload as a JSON value, why not, the size of its JSON text) by the station's schema.

    Protobuf: parsed with the message loaded for producing (``proto_msgs``, :func:`parse_descriptor`),
    rendered in protobuf's JSON mapping with proto field names; JSON: parsed. A decoded form of more
    than ``limit`` bytes (0: no limit) is not made: a protobuf message's JSON size is bounded from its
    fields first (a few bytes can name a long enum value or field: the JSON could be a thousand times
    the payload). At most ``DECODE_MAX_DEPTH`` levels deep. Never raises."""
    schema = m.schema_updates_data.get(key) or {}
    kind = schema.get("type", "")
    template = m.proto_msgs.get(key) if kind == "protobuf" else None
    if kind == "protobuf" and template is None:
        return None, "the station's protobuf schema is not loaded yet", 0
    try:
        obj: Any
        if template is not None:
            message = type(template)()
            message.ParseFromString(data)
            if limit:
                _json_bound(message, limit)
            obj = json_format.MessageToDict(message, preserving_proto_field_name=True)
        elif kind == "json":
            obj = orjson.loads(data)
        else:
            return None, f"the station has {'a ' + kind + ' schema' if kind else 'no schema'} now", 0
        size = len(orjson.dumps(obj))
        if limit and size > limit:
            raise _TooLarge(f"its JSON is {size} bytes")
        value = struct_pb2.Value()
        _set_value(value, obj, 0)
    except _TooLarge as exc:
        return None, _too_large(str(exc), len(data)), 0
    except _Undecodable as exc:
        return None, str(exc), 0
    except Exception as exc:  # protobuf's and orjson's errors, and json_format's TypeErrors (a message named
        # google.protobuf.Any, Timestamp... is rendered as that well-known type)
        what = f"protobuf {template.DESCRIPTOR.full_name}" if template is not None else "JSON"
        return None, f"not a {what}: {schema_error(str(exc)) or type(exc).__name__}", 0
    return value, "", size


def _too_large(what: str, stored: int) -> str:
    return (f"the decoded message is too large ({what}), more than this answer allows for a stored message of "
            f"{stored} bytes; decode the message field yourself")


def _set_value(value: struct_pb2.Value, obj: Any, depth: int) -> None:
    """``value`` set to the JSON value ``obj`` (what json_format makes, without its JSON text round trip)."""
    if isinstance(obj, dict | list) and depth >= DECODE_MAX_DEPTH:
        raise _Undecodable(f"the decoded message nests deeper than {DECODE_MAX_DEPTH} levels; consume without decode")
    if isinstance(obj, dict):
        fields = value.struct_value.fields
        if not obj:
            value.struct_value.SetInParent()
        for k, item in obj.items():
            _set_value(fields[str(k)], item, depth + 1)
    elif isinstance(obj, list):
        values = value.list_value.values
        if not obj:
            value.list_value.SetInParent()
        for item in obj:
            _set_value(values.add(), item, depth + 1)
    elif obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int | float):
        value.number_value = float(obj)
    else:
        value.string_value = str(obj)


def _json_bound(message: Any, budget: int) -> int:
    """At least the size of ``message``'s JSON (protobuf's mapping, proto field names);
    _Undecodable as soon as it passes ``budget``."""
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Any":  # its value would be decoded by a type the schema names: not bounded here
        raise _Undecodable("google.protobuf.Any is not decoded; consume without decode")
    total = _WKT_BOUND if name.startswith("google.protobuf.") else 2
    for field, value in message.ListFields():
        total += len(field.name) + 4
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name
            key_field, value_field = entry["key"], entry["value"]
            for k, v in value.items():
                total += _scalar_bound(key_field, k) + 4
                total += (_json_bound(v, budget - total) if value_field.message_type is not None
                          else _scalar_bound(value_field, v))
                if total > budget:
                    break
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    total += _json_bound(item, budget - total) + 2
                    if total > budget:
                        break
            elif field.type == field.TYPE_STRING:
                total += 6 * sum(map(len, value)) + 4 * len(value)
            elif field.type == field.TYPE_BYTES:
                total += sum(len(v) * 4 // 3 + 6 for v in value)
            elif field.type == field.TYPE_ENUM:
                names = _enum_sizes(field.enum_type)
                total += sum(names.get(v, _NUMBER_BOUND) + 2 for v in value)
            else:
                total += len(value) * (_NUMBER_BOUND + 2)
        elif field.message_type is not None:
            total += _json_bound(value, budget - total)
        else:
            total += _scalar_bound(field, value)
        if total > budget:
            raise _TooLarge(f"its JSON is more than {budget} bytes")
    return total


def _scalar_bound(field: Any, value: Any) -> int:
    """At least the JSON size of a scalar field's value."""
    if field.type == field.TYPE_STRING:
        return 6 * len(value) + 2  # a control character is escaped as \\u00XX
    if field.type == field.TYPE_BYTES:
        return len(value) * 4 // 3 + 6  # base64
    if field.type == field.TYPE_ENUM:
        return _enum_sizes(field.enum_type).get(value, _NUMBER_BOUND)
    return _NUMBER_BOUND


@functools.lru_cache(maxsize=256)
def _enum_sizes(enum: Any) -> dict[int, int]:
    """The JSON size of each value of ``enum`` (its name quoted; an unknown number renders as digits)."""
    return {v.number: len(v.name) + 2 for v in enum.values}


SCHEMAVERSE_DLS = "$memphis_schemaverse_dls"


def refusal_report(m: Memphis, key: str, producer_name: str, data: bytes, headers: Mapping[str, str],
                   error: str) -> bytes:
    """What memphis-py publishes on ``$memphis_schemaverse_dls`` when its schema check refused a message
    (docs/memphis-py.md, 1.5), for a message the gateway refused: the same dead-letter path."""
    return json.dumps({
        "station_name": key,
        "producer": {"name": producer_name, "connection_id": m.connection_id or ""},
        "creation_unix": int(time.time()),
        "message": {"data": data.hex(), "headers": {**headers, "$memphis_producedBy": producer_name,
                                                    "$memphis_connectionId": m.connection_id or ""}},
        "validation_error": error,
    }).encode()
