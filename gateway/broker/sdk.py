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


def decode_payload(m: Memphis, key: str, data: bytes) -> tuple[struct_pb2.Value | None, str, int]:
    """(the payload as a JSON value, why not, the size of its JSON text) by the station's schema.

    Protobuf: parsed with the message loaded for producing (``proto_msgs``, :func:`parse_descriptor`),
    rendered in protobuf's JSON mapping with proto field names; JSON: parsed. Never raises."""
    schema = m.schema_updates_data.get(key) or {}
    kind = schema.get("type", "")
    template = m.proto_msgs.get(key) if kind == "protobuf" else None
    if kind == "protobuf" and template is None:
        return None, "the station's protobuf schema is not loaded yet", 0
    try:
        if template is not None:
            message = type(template)()
            message.ParseFromString(data)
            text = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)
        elif kind == "json":
            text = orjson.dumps(orjson.loads(data)).decode()
        else:
            return None, f"the station has {'a ' + kind + ' schema' if kind else 'no schema'} now", 0
        value = struct_pb2.Value()
        json_format.Parse(text, value, max_recursion_depth=100)
    except (DecodeError, ValueError, RuntimeError, json_format.ParseError, orjson.JSONDecodeError) as exc:
        what = f"protobuf {template.DESCRIPTOR.full_name}" if template is not None else "JSON"
        return None, f"not a {what}: {schema_error(str(exc)) or type(exc).__name__}", 0
    return value, "", len(text)


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
