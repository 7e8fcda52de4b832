"""Checks a Schemaverse schema definition before the control plane stores it.

Only the definition is checked here (is it a JSON Schema, a GraphQL SDL, an Avro schema?);
messages are validated by the producers (memphis-py does it client side).
"""

from __future__ import annotations

import json

from gateway.core.errors import InvalidArgument

SCHEMA_TYPES = ("json", "graphql", "protobuf", "avro")


def check_schema(schema_type: str, content: str) -> None:
    """Raise ``InvalidArgument`` unless ``content`` is a usable schema of ``schema_type``."""
    if schema_type not in SCHEMA_TYPES:
        raise InvalidArgument(f"schema type not supported, use one of: {', '.join(SCHEMA_TYPES)}")
    if not isinstance(content, str) or not content.strip():
        raise InvalidArgument("schema content can not be empty")
    try:
        if schema_type == "json":
            from jsonschema.validators import validator_for

            schema = json.loads(content)
            validator_for(schema).check_schema(schema)
        elif schema_type == "graphql":
            from graphql import build_schema

            build_schema(content)
        elif schema_type == "avro":
            import fastavro

            fastavro.parse_schema(json.loads(content))
        else:
            # memphis-py needs a compiled FileDescriptorSet, which the server must build
            # from the .proto text; no protobuf compiler is available at run time here.
            raise InvalidArgument("protobuf schemas are not supported by the gateway's control plane")
    except InvalidArgument:
        raise
    except Exception as err:  # each library has its own error types
        raise InvalidArgument(f"invalid {schema_type} schema: {err}") from err
