"""The station catalog the management servicers see (``gateway.broker.catalogseam``), over
the control plane's catalog (``gateway.embedded.catalog``): the same stations the SDKs see.

It lives beside ``gateway.app``, which wires it in: the servicers may not import
``gateway.embedded``, and ``gateway.embedded`` knows nothing of the seam.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gateway.broker.catalogseam import NoCatalog, PartitionState, StationCatalog, StationSettings
from gateway.core.errors import NotFound
from gateway.embedded.catalog import Catalog
from gateway.embedded.specs import AlreadyExists, StationSpec
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


def management_servicers(catalog: Catalog | None) -> list[object]:
    """The management servicers, over ``catalog`` (None: an external Memphis broker, no catalog of ours)."""
    stations: StationCatalog = ManagedCatalog(catalog) if catalog is not None else NoCatalog()
    return [StationService(stations)]
