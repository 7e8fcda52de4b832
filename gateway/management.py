"""The station catalog the management servicers see (``gateway.broker.catalogseam``), over
the control plane's catalog (``gateway.embedded.catalog``): the same stations the SDKs see.

It lives beside ``gateway.app``, which wires it in: the servicers may not import
``gateway.embedded``, and ``gateway.embedded`` knows nothing of the seam.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gateway.broker.catalogseam import (
    DeadLetterState,
    DeadLetterStore,
    NoCatalog,
    PartitionState,
    SchemaCatalog,
    SchemaState,
    SchemaVersionState,
    StationCatalog,
    StationSettings,
)
from gateway.core.errors import NotFound
from gateway.embedded.catalog import Catalog
from gateway.embedded.deadletters import DeadLetters
from gateway.embedded.specs import AlreadyExists, StationSpec
from gateway.servicers.deadletters import DeadLetterService
from gateway.servicers.schemas import SchemaService
from gateway.servicers.stations import StationService

# The settings a creation request compares with an existing station's (created_by & co. are not settings).
_COMPARED = ("partitions_number", "retention_type", "retention_value", "storage_type", "replicas",
             "idempotency_window_ms", "schema_name", "poison_to_dls", "schemaverse_to_dls")


def settings_of(spec: StationSpec) -> StationSettings:
    return StationSettings(
        name=spec.name,
        partitions_number=spec.partitions_number,
        retention_type=spec.retention_type,
        retention_value=spec.retention_value,
        storage_type=spec.storage_type,
        replicas=spec.replicas,
        idempotency_window_ms=spec.idempotency_window_ms,
        schema_name=spec.schema_name,
        dls_poison=spec.poison_to_dls,
        dls_schemaverse=spec.schemaverse_to_dls,
    )


def spec_of(request: StationSettings, created_by: str = "") -> StationSpec:
    """The request with Memphis's defaults (``StationSpec``'s) for what it leaves out."""
    spec = StationSpec(name=request.name, created_by=created_by)
    given: dict[str, Any] = {
        "partitions_number": request.partitions_number,
        "retention_type": request.retention_type,
        "retention_value": request.retention_value,
        "storage_type": request.storage_type,
        "replicas": request.replicas,
        "idempotency_window_ms": request.idempotency_window_ms,
        "schema_name": request.schema_name,
        "poison_to_dls": request.dls_poison,
        "schemaverse_to_dls": request.dls_schemaverse,
    }
    return replace(spec, **{k: v for k, v in given.items() if v is not None}).normalized()


class ManagedCatalog:
    """``StationCatalog`` over the embedded catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def create_station(self, request: StationSettings) -> tuple[StationSettings, bool]:
        spec = spec_of(request)
        try:
            info = await self._catalog.create_station(spec)
            return settings_of(info.spec), True
        except AlreadyExists:
            existing = await self._catalog.station_info(spec.name)
            if existing is None:  # deleted meanwhile
                raise
            differ = [f for f in _COMPARED if getattr(existing.spec, f) != getattr(spec, f)]
            if differ:
                raise AlreadyExists(
                    f"Station {spec.name} already exists with other settings ({', '.join(differ)}); "
                    "delete it first or create it with its current settings"
                ) from None
            return settings_of(existing.spec), False

    async def list_stations(self) -> list[StationSettings]:
        return [settings_of(spec) for spec in await self._catalog.station_specs()]

    async def describe_station(self, name: str) -> tuple[StationSettings, list[PartitionState]]:
        info = await self._catalog.station_info(name)
        if info is None:
            raise NotFound(f"Station {name} does not exist")
        states = [PartitionState(partition=p, messages=n, first_sequence=first, last_sequence=last)
                  for p, n, first, last in await self._catalog.partition_states(info)]
        return settings_of(info.spec), states

    async def delete_station(self, name: str) -> None:
        if not await self._catalog.destroy_station(name):
            raise NotFound(f"Station {name} does not exist")


def schema_state(record: dict[str, Any], stations: list[str] | None = None) -> SchemaState:
    return SchemaState(
        name=str(record["name"]),
        type=str(record["type"]),
        versions=[
            SchemaVersionState(
                version_number=int(v["version_number"]),
                definition=str(v["schema_content"]),
                message_struct_name=str(v.get("message_struct_name") or ""),
                descriptor=str(v.get("descriptor") or ""),
                created_by=str(v.get("created_by") or ""),
                created_at=float(v.get("created_at") or 0.0),
            )
            for v in record.get("versions", [])
        ],
        stations=stations or [],
    )


class ManagedSchemas:
    """``SchemaCatalog`` over the embedded catalog (whose changes reach the SDKs' producers)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def create_schema(
        self, name: str, schema_type: str, definition: str, message_struct_name: str, created_by: str
    ) -> tuple[SchemaState, bool]:
        created = True
        try:
            await self._catalog.create_schema(
                name, schema_type, definition, created_by=created_by, message_struct_name=message_struct_name
            )
        except AlreadyExists:
            created = False
        record = await self._catalog.schema_record(name)
        if record is None:  # deleted meanwhile
            raise NotFound(f"Schema {name} does not exist")
        return schema_state(record), created

    async def list_schemas(self) -> list[SchemaState]:
        return [schema_state(record) for record in await self._catalog.schema_records()]

    async def describe_schema(self, name: str) -> SchemaState:
        record = await self._catalog.schema_record(name)
        if record is None:
            raise NotFound(f"Schema {name} does not exist")
        return schema_state(record, await self._catalog.stations_using(name))

    async def delete_schema(self, name: str) -> None:
        if not await self._catalog.delete_schema(name):
            raise NotFound(f"Schema {name} does not exist")

    async def attach_schema(self, station: str, schema_name: str) -> None:
        await self._catalog.attach_schema(schema_name, station)

    async def detach_schema(self, station: str) -> None:
        await self._catalog.detach_schema(station)


class ManagedDeadLetters:
    """``DeadLetterStore`` over the control plane's dead letters."""

    def __init__(self, dead_letters: DeadLetters) -> None:
        self._dead_letters = dead_letters

    async def list_dead_letters(self, station: str) -> list[DeadLetterState]:
        return [
            DeadLetterState(
                id=d.id, reason=d.reason, data=d.data, headers=d.headers, group=d.group, deliveries=d.deliveries,
                partition=d.partition, sequence=d.sequence, validation_error=d.error,
                producer_name=d.extra.get("Producer", ""), stored_at=d.stored_at,
            )
            for d in await self._dead_letters.letters(station)
        ]

    async def resend_dead_letters(self, station: str, ids: list[int]) -> tuple[int, list[int]]:
        return await self._dead_letters.resend(station, ids)

    async def purge_dead_letters(self, station: str) -> None:
        await self._dead_letters.purge(station)


def management_servicers(catalog: Catalog | None, dead_letters: DeadLetters | None = None) -> list[object]:
    """The management servicers, over ``catalog`` and ``dead_letters`` (None: an external Memphis broker,
    no catalog of ours)."""
    stations: StationCatalog = ManagedCatalog(catalog) if catalog is not None else NoCatalog()
    schemas: SchemaCatalog = ManagedSchemas(catalog) if catalog is not None else NoCatalog()
    letters: DeadLetterStore = ManagedDeadLetters(dead_letters) if dead_letters is not None else NoCatalog()
    return [StationService(stations), SchemaService(schemas), DeadLetterService(letters)]
