"""Catalog records in JetStream KV: their keys, their JSON, and JetStream errors as gateway errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from nats.errors import Error as NatsError
from nats.js.errors import APIError

from gateway.core.errors import GatewayError, InvalidArgument, Unavailable
from gateway.core.names import validate_name
from gateway.embedded.specs import SchemaInfo, StationSpec


def kv_key(name: str) -> str:
    return name.lower().replace(".", "=")


def broker_error(err: Exception) -> GatewayError:
    """A JetStream / NATS failure as a gateway error (400s stay invalid arguments)."""
    if isinstance(err, APIError):
        text = err.description or str(err)
        return InvalidArgument(text) if err.code == 400 else Unavailable(text)
    return Unavailable(f"broker unavailable: {err!s}" if str(err) else f"broker unavailable: {type(err).__name__}")


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    try:
        yield
    except GatewayError:
        raise
    except (TimeoutError, APIError, NatsError) as err:
        raise broker_error(err) from err


def dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def station_spec(data: bytes | None) -> StationSpec:
    record = json.loads(data or b"{}")
    return StationSpec(**{f.name: record[f.name] for f in fields(StationSpec) if f.name in record})


def active_schema(data: bytes | None) -> SchemaInfo:
    record = json.loads(data or b"{}")
    version = record["versions"][-1]
    return SchemaInfo(
        name=record["name"],
        type=record["type"],
        version_number=version["version_number"],
        content=version["schema_content"],
        descriptor=version.get("descriptor", ""),
        message_struct_name=version.get("message_struct_name", ""),
    )


def check_name(name: str, kind: str) -> None:
    if reason := validate_name(name, kind):
        raise InvalidArgument(reason)
