"""The well-known types (``google.protobuf.*``): one table for the codec, the text parser and OpenAPI.

Each is written in JSON by ``json_format`` (protojson), not field by field:

* wrappers (``Int64Value``, ...) as their bare value;
* :data:`TEXT` ones as a JSON string, which is also how a path or query value gives them;
* :data:`JSON_VALUES` as any JSON (a query value holds that JSON);
* ``Any`` and ``Empty`` as objects.
"""

from __future__ import annotations

from typing import Any

_P = "google.protobuf."
WRAPPERS = frozenset(
    f"{_P}{n}Value" for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
TEXT = frozenset(f"{_P}{n}" for n in ("Timestamp", "Duration", "FieldMask"))
JSON_VALUES = frozenset(f"{_P}{n}" for n in ("Struct", "Value", "ListValue"))
JSON_FORMAT = TEXT | JSON_VALUES | {f"{_P}Any", f"{_P}Empty"}  # whole messages through json_format
NULL_VALUE = f"{_P}NullValue"  # an enum, written as JSON null

# OpenAPI schema of each (wrappers: their value's schema, built by the caller)
OPENAPI_SCHEMA: dict[str, dict[str, Any]] = {
    f"{_P}Timestamp": {"type": "string", "format": "date-time"},
    f"{_P}Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    f"{_P}FieldMask": {"type": "string"},
    f"{_P}Struct": {"type": "object"},
    f"{_P}Value": {},
    f"{_P}ListValue": {"type": "array"},
    f"{_P}Empty": {"type": "object"},
    f"{_P}Any": {"type": "object", "properties": {"@type": {"type": "string"}}, "required": ["@type"]},
}


def has_text_form(name: str) -> bool:
    """Whether a message type can be given as one path or query value."""
    return name in TEXT or name in JSON_VALUES or name in WRAPPERS
