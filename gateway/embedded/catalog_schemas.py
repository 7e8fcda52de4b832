"""The schema half of the catalog: Schemaverse schemas, their versions, and which stations use them.

A mixin of :class:`gateway.embedded.catalog.Catalog` (its KV buckets, cache and pushes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from nats.js.errors import (
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from gateway.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from gateway.core.names import internal_name
from gateway.embedded.records import active_schema, broker_errors, check_name, dump, kv_key
from gateway.embedded.schemacheck import check_schema, compile_proto
from gateway.embedded.specs import AlreadyExists, SchemaInfo, StationInfo, StationSpec, no_schema_update

log = logging.getLogger("gateway.controlplane")


class SchemaCatalog:
    """Schema operations; :class:`Catalog` provides the buckets, the cache and the pushes declared here."""

    if TYPE_CHECKING:
        _kvs: tuple[KeyValue, KeyValue] | None
        _locks: Any

        async def _get(self, kv: KeyValue, key: str) -> KeyValue.Entry | None: ...

        async def _push(self, subject: str, payload: dict[str, Any]) -> None: ...

        async def _modify_station(self, name: str, change: Callable[[StationSpec], StationSpec]) -> StationInfo: ...

        async def stations_using(self, schema_name: str) -> list[str]: ...

        async def _push_to_stations_using(self, schema: SchemaInfo) -> None: ...

    @property
    def _schemas(self) -> KeyValue:
        if self._kvs is None:
            raise Unavailable("control plane not started")
        return self._kvs[1]

    async def schema_info(self, name: str) -> SchemaInfo | None:
        """The active version of the schema, or None."""
        check_name(name, "schema")
        entry = await self._get(self._schemas, kv_key(name))
        return active_schema(entry.value) if entry is not None else None

    async def create_schema(
        self, name: str, schema_type: str, content: str, *, created_by: str = "", message_struct_name: str = ""
    ) -> SchemaInfo:
        """Store a schema, or a new version of it; ``AlreadyExists`` if the content is unchanged."""
        check_name(name, "schema")
        name = name.lower()
        check_schema(schema_type, content)
        descriptor = ""
        if schema_type == "protobuf":
            descriptor, message_struct_name = await compile_proto(content, message_struct_name)
        key = kv_key(name)
        async with self._locks[f"schema:{key}"]:
            entry = await self._get(self._schemas, key)
            record: dict[str, Any] = (
                json.loads(entry.value or b"{}") if entry else {"name": name, "type": schema_type, "versions": []}
            )
            versions: list[dict[str, Any]] = record["versions"]
            if entry is not None and record["type"] != schema_type:
                raise InvalidArgument(f"Schema {name} already exists with type {record['type']}")
            if versions and versions[-1]["schema_content"] == content and (
                versions[-1].get("message_struct_name", "") == message_struct_name
            ):
                raise AlreadyExists(f"Schema {name} already exists")
            versions.append(
                {
                    "version_number": len(versions) + 1,
                    "schema_content": content,
                    "descriptor": descriptor,
                    "message_struct_name": message_struct_name,
                    "created_by": created_by,
                    "created_at": time.time(),
                }
            )
            with broker_errors():
                try:
                    if entry is None:
                        await self._schemas.create(key, dump(record))
                    else:
                        await self._schemas.update(key, dump(record), last=entry.revision)
                except KeyWrongLastSequenceError:
                    raise AlreadyExists(f"Schema {name} already exists") from None
        schema = active_schema(dump(record))
        if entry is not None:
            await self._push_to_stations_using(schema)
        return schema

    async def schema_record(self, name: str) -> dict[str, Any] | None:
        """The stored schema: ``{"name", "type", "versions": [...]}`` (the last version is active), or None."""
        check_name(name, "schema")
        entry = await self._get(self._schemas, kv_key(name))
        if entry is None or not entry.value:
            return None
        record: dict[str, Any] = json.loads(entry.value)
        return record

    async def schema_records(self) -> list[dict[str, Any]]:
        """Every stored schema, by name."""
        records = []
        with broker_errors():
            try:
                keys = await self._schemas.keys()
            except NoKeysError:
                return []
            for key in keys:
                entry = await self._get(self._schemas, key)
                if entry is not None and entry.value:
                    records.append(json.loads(entry.value))
        return sorted(records, key=lambda record: str(record.get("name", "")))

    async def delete_schema(self, name: str) -> bool:
        """Delete the schema and its versions; False if there was none.

        FailedPrecondition (HTTP 409) while a station enforces it."""
        check_name(name, "schema")
        key = kv_key(name)
        async with self._locks[f"schema:{key}"]:
            if await self._get(self._schemas, key) is None:
                return False
            if using := await self.stations_using(name):
                raise FailedPrecondition(
                    f"Schema {name.lower()} is attached to station(s) {', '.join(using)}: detach it first",
                    http_status=409,
                )
            with broker_errors():
                await self._schemas.delete(key)
        log.info("deleted schema %s", name.lower())
        return True

    async def _push_schema(self, station: str, update_type: int, update: dict[str, Any]) -> None:
        payload = {"UpdateType": update_type, "init": update}
        await self._push(f"$memphis_schema_updates_{internal_name(station)}", payload)

    async def attach_schema(self, schema_name: str, station: str) -> StationInfo:
        """Enforce the schema on the station; producers created later validate against it."""
        schema = await self.schema_info(schema_name)
        if schema is None:
            raise NotFound(f"Schema {schema_name} does not exist")
        info = await self._modify_station(station, lambda spec: replace(spec, schema_name=schema.name))
        await self._push_schema(info.name, 1, schema.schema_update())
        return info

    async def detach_schema(self, station: str) -> StationInfo:
        info = await self._modify_station(station, lambda spec: replace(spec, schema_name=""))
        await self._push_schema(info.name, 2, no_schema_update())
        return info

