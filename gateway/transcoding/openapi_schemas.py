"""JSON Schemas of proto messages and fields, for the OpenAPI document (``openapi``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from memgw.v1 import options_pb2

from gateway.transcoding import wkt
from gateway.transcoding.jsonscalars import INT_RANGES

_F = FieldDescriptor
TEXT = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}
_FLOAT = {"anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}


class Schemas:
    """JSON Schemas of message types, as ``components/schemas`` entries, for requests or responses.

    Request schemas take what the codec accepts (no field is required, unknown keys are
    ignored); response schemas say what it emits (every field without presence, nothing else).
    A type used both ways gets two entries, ``<name>Input`` and ``<name>Output``.
    """

    def __init__(self, both_ways: set[str]) -> None:
        self.components: dict[str, Any] = {}
        self._both_ways = both_ways

    def ref(self, desc: Descriptor, response: bool) -> dict[str, Any]:
        name = desc.full_name
        if name in wkt.OPENAPI_SCHEMA:
            return dict(wkt.OPENAPI_SCHEMA[name])
        if name in wkt.WRAPPERS:
            return self.field(desc.fields_by_name["value"], response)
        key = name + ("Output" if response else "Input") if name in self._both_ways else name
        if key not in self.components:
            self.components[key] = {}  # placeholder: recursive types refer to it
            self.components[key] = self.message(desc, response)
        return {"$ref": f"#/components/schemas/{key}"}

    def message(self, desc: Descriptor, response: bool, *, without: Iterable[str] = ()) -> dict[str, Any]:
        skip = set(without)
        properties = {f.name: self.field(f, response) for f in desc.fields if f.name not in skip}
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if response:
            schema["required"] = [f.name for f in desc.fields if not f.has_presence and f.name not in skip]
            schema["additionalProperties"] = False
        oneofs = [o for o in desc.oneofs if len(o.fields) > 1]
        if oneofs and not response:
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.name for f in o.fields)}" for o in oneofs
            )
        return schema

    def field(self, fd: FieldDescriptor, response: bool) -> dict[str, Any]:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.single(value, response)}
            if key.type == _F.TYPE_BOOL:
                schema["propertyNames"] = {"enum": ["true", "false"]}
            elif key.type != _F.TYPE_STRING:
                schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
            return schema
        if fd.is_repeated:
            return {"type": "array", "items": self.single(fd, response)}
        return self.single(fd, response)

    def single(self, fd: FieldDescriptor, response: bool) -> dict[str, Any]:
        """The schema of one value of ``fd`` (an element if repeated)."""
        if fd.message_type is not None:
            return self.ref(fd.message_type, response)
        return scalar_schema(fd)


def scalar_schema(fd: FieldDescriptor) -> dict[str, Any]:
    t = fd.type
    if t in INT_RANGES:
        lo, hi, name = INT_RANGES[t]
        return {"type": "integer", "format": name, "minimum": lo, "maximum": hi}
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return dict(_FLOAT)
    if t == _F.TYPE_BOOL:
        return {"type": "boolean"}
    if t == _F.TYPE_STRING:
        return {"type": "string"}
    if t == _F.TYPE_BYTES:
        if fd.GetOptions().Extensions[options_pb2.json_text]:
            return {"type": "string", "description": "UTF-8 text"}
        return {"type": "string", "format": "byte", "contentEncoding": "base64"}
    if t == _F.TYPE_ENUM:
        if fd.enum_type.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        return {"type": "string", "enum": [v.name for v in fd.enum_type.values], "description": "or its number"}
    return {}


def messages_of(desc: Descriptor, seen: set[str]) -> set[str]:
    if desc.full_name in seen:
        return seen
    seen.add(desc.full_name)
    for fd in desc.fields:
        if fd.message_type is not None:
            messages_of(fd.message_type, seen)
    return seen


def text_schema(fd: FieldDescriptor) -> dict[str, Any]:
    """The schema of a field given as text (path captures, query values)."""
    if fd.message_type is not None:
        name = fd.message_type.full_name
        if name in wkt.WRAPPERS:
            return text_schema(fd.message_type.fields_by_name["value"])
        return dict(wkt.OPENAPI_SCHEMA.get(name, TEXT)) if name in wkt.TEXT else {"type": "string"}
    if fd.type == _F.TYPE_ENUM and fd.enum_type.full_name == "google.protobuf.NullValue":
        return {"type": "string", "enum": ["NULL_VALUE"]}
    return scalar_schema(fd)
