"""StationService: create, list, describe and delete stations in the gateway's catalog."""

from __future__ import annotations

from memgw.v1 import stations_pb2

from gateway.broker.catalogseam import StationCatalog, StationSettings
from gateway.core.errors import InvalidArgument
from gateway.rpc.call import CallContext


def station_message(s: StationSettings) -> stations_pb2.Station:
    return stations_pb2.Station(
        name=s.name,
        partitions_number=s.partitions_number or 0,
        retention_type=s.retention_type or "",
        retention_value=s.retention_value or 0,
        storage_type=s.storage_type or "",
        replicas=s.replicas or 0,
        idempotency_window_ms=s.idempotency_window_ms or 0,
        schema_name=s.schema_name or "",
        dls=stations_pb2.DeadLetterSettings(poison=bool(s.dls_poison), schemaverse=bool(s.dls_schemaverse)),
    )


def settings_request(r: stations_pb2.CreateStationRequest) -> StationSettings:
    if not r.name:
        raise InvalidArgument("name is required")
    return StationSettings(
        name=r.name,
        partitions_number=r.partitions_number if r.HasField("partitions_number") else None,
        retention_type=r.retention_type if r.HasField("retention_type") else None,
        retention_value=r.retention_value if r.HasField("retention_value") else None,
        storage_type=r.storage_type if r.HasField("storage_type") else None,
        replicas=r.replicas if r.HasField("replicas") else None,
        idempotency_window_ms=r.idempotency_window_ms if r.HasField("idempotency_window_ms") else None,
        schema_name=r.schema_name if r.HasField("schema_name") else None,
        dls_poison=r.dls.poison if r.dls.HasField("poison") else None,
        dls_schemaverse=r.dls.schemaverse if r.dls.HasField("schemaverse") else None,
    )


def _name(name: str) -> str:
    if not name:
        raise InvalidArgument("name is required")
    return name


class StationService:
    SERVICE = "memgw.v1.StationService"

    def __init__(self, catalog: StationCatalog) -> None:
        self._catalog = catalog

    async def CreateStation(
        self, request: stations_pb2.CreateStationRequest, ctx: CallContext
    ) -> stations_pb2.CreateStationResponse:
        ctx.require_principal()
        settings, created = await self._catalog.create_station(settings_request(request))
        return stations_pb2.CreateStationResponse(success=True, created=created, station=station_message(settings))

    async def ListStations(
        self, request: stations_pb2.ListStationsRequest, ctx: CallContext
    ) -> stations_pb2.ListStationsResponse:
        ctx.require_principal()
        stations = await self._catalog.list_stations()
        return stations_pb2.ListStationsResponse(success=True, stations=[station_message(s) for s in stations])

    async def GetStation(
        self, request: stations_pb2.GetStationRequest, ctx: CallContext
    ) -> stations_pb2.GetStationResponse:
        ctx.require_principal()
        settings, states = await self._catalog.describe_station(_name(request.name))
        return stations_pb2.GetStationResponse(
            success=True,
            station=station_message(settings),
            total_messages=sum(s.messages for s in states),
            partitions=[
                stations_pb2.PartitionCount(
                    partition=s.partition, messages=s.messages,
                    first_sequence=s.first_sequence, last_sequence=s.last_sequence,
                )
                for s in states
            ],
        )

    async def DeleteStation(
        self, request: stations_pb2.DeleteStationRequest, ctx: CallContext
    ) -> stations_pb2.DeleteStationResponse:
        ctx.require_principal()
        await self._catalog.delete_station(_name(request.name))
        return stations_pb2.DeleteStationResponse(success=True)
