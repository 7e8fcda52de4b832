"""JSON <-> protobuf for one scalar field: strict decoders and encoders by field type (see ``jsoncodec``)."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from memgw.v1 import options_pb2

from gateway.core.errors import InvalidArgument
from gateway.transcoding import wkt

Encoder = Callable[[Any], Any]
Decoder = Callable[[Any, str], Any]

_F = FieldDescriptor
_I32, _U32 = (-(2**31), 2**31 - 1, "int32"), (0, 2**32 - 1, "uint32")
_I64, _U64 = (-(2**63), 2**63 - 1, "int64"), (0, 2**64 - 1, "uint64")
# Integer field type -> (min, max, name); shared with the text parser of httprules.
INT_RANGES: dict[int, tuple[int, int, str]] = {
    _F.TYPE_INT32: _I32, _F.TYPE_SINT32: _I32, _F.TYPE_SFIXED32: _I32, _F.TYPE_UINT32: _U32, _F.TYPE_FIXED32: _U32,
    _F.TYPE_INT64: _I64, _F.TYPE_SINT64: _I64, _F.TYPE_SFIXED64: _I64, _F.TYPE_UINT64: _U64, _F.TYPE_FIXED64: _U64,
}  # fmt: skip
_FLOAT_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_JSON_TYPE = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array"}
_JSON_TYPE[dict] = "an object"


class JsonDecodeError(InvalidArgument):
    """A JSON value that does not fit the message: HTTP 400, message names the field."""


def json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPE.get(type(value), type(value).__name__)


def fail(path: str, expected: str, value: Any) -> JsonDecodeError:
    got = json_type(value)
    if type(value) is float and expected == "an integer":
        got = repr(value)
    where = f"{path}: " if path else ""
    return JsonDecodeError(f"{where}expected {expected}, got {got}")


def int_decoder(field_type: int) -> Decoder:
    lo, hi, name = INT_RANGES[field_type]

    def decode(v: Any, path: str) -> int:
        if type(v) is not int:
            raise fail(path, "an integer" if type(v) is float else "a number", v)
        if not lo <= v <= hi:
            raise JsonDecodeError(f"{path}: {v} is out of range for {name}")
        return v

    return decode


def _float_decode(v: Any, path: str) -> float:
    t = type(v)
    if t is float or t is int:
        return float(v)
    if t is str and v in _FLOAT_NAMES:
        return _FLOAT_NAMES[v]
    raise fail(path, "a number", v)


def _float_encode(v: float) -> Any:
    if math.isfinite(v):
        return v
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


def _bool_decode(v: Any, path: str) -> bool:
    if type(v) is not bool:
        raise fail(path, "a boolean", v)
    return v


def _str_decode(v: Any, path: str) -> str:
    if type(v) is not str:
        raise fail(path, "a string", v)
    return v


def _bytes_decode(v: Any, path: str) -> bytes:
    if type(v) is not str:
        raise fail(path, "a base64 string", v)
    return decode_base64(v, path)


def decode_base64(text: str, path: str) -> bytes:
    """Standard or URL-safe base64, padding optional (protojson's rule)."""
    s = text.rstrip("=")
    s += "=" * (-len(s) % 4)
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise JsonDecodeError(f"{path}: invalid base64") from None


def _text_bytes_decode(v: Any, path: str) -> bytes:
    if type(v) is not str:
        raise fail(path, "a string", v)
    return v.encode("utf-8", "surrogatepass")


def _bytes_encode(v: bytes) -> str:
    return base64.b64encode(v).decode("ascii")


def _text_bytes_encode(v: bytes) -> str:
    return v.decode("utf-8", "replace")


def enum_codec(field: FieldDescriptor) -> tuple[Encoder | None, Decoder]:
    enum = field.enum_type
    if enum.full_name == wkt.NULL_VALUE:

        def decode_null(v: Any, path: str) -> int:
            if v is None or v == "NULL_VALUE" or (type(v) is int and v == 0):
                return 0
            raise fail(path, "null", v)

        return (lambda _v: None), decode_null
    names: dict[int, str] = {v.number: v.name for v in enum.values}
    numbers: dict[str, int] = {v.name: v.number for v in enum.values}
    closed = bool(getattr(enum, "is_closed", False))

    def decode(v: Any, path: str) -> int:
        if type(v) is str:
            number = numbers.get(v)
            if number is None:
                raise JsonDecodeError(f"{path}: unknown value {v!r} for enum {enum.full_name}")
            return number
        if type(v) is int and -(2**31) <= v < 2**31 and (not closed or v in names):
            return v
        raise fail(path, f"one of {', '.join(numbers)}", v)

    def encode(v: int) -> Any:
        return names.get(v, v)

    return encode, decode


def scalar_decoder(field: FieldDescriptor) -> Decoder:
    """The JSON -> Python converter of a non-message field's single value."""
    t = field.type
    if t in INT_RANGES:
        return int_decoder(t)
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return _float_decode
    if t == _F.TYPE_BOOL:
        return _bool_decode
    if t == _F.TYPE_STRING:
        return _str_decode
    if t == _F.TYPE_BYTES:
        return _text_bytes_decode if is_json_text(field) else _bytes_decode
    if t == _F.TYPE_ENUM:
        return enum_codec(field)[1]
    raise TypeError(f"{field.full_name}: no scalar decoder for type {t}")


def scalar_encoder(field: FieldDescriptor) -> Encoder | None:
    t = field.type
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return _float_encode
    if t == _F.TYPE_BYTES:
        return _text_bytes_encode if is_json_text(field) else _bytes_encode
    if t == _F.TYPE_ENUM:
        return enum_codec(field)[0]
    return None  # ints, bools and strings are JSON as they are


def is_json_text(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[options_pb2.json_text])

