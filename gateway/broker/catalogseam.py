"""The seam between the management servicers and the station catalog.

Stations, schemas and dead letters are managed in the catalog the gateway's
control plane keeps (``gateway.embedded.catalog``), the one the Memphis SDKs see. The
servicers see only :class:`StationCatalog`, :class:`SchemaCatalog` and
:class:`DeadLetterStore`; ``gateway.management`` implements it over the
embedded catalog and ``gateway.app`` wires it in. Against an external Memphis broker there
is no catalog of ours: :class:`NoCatalog` answers every call with FAILED_PRECONDITION.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.core.errors import FailedPrecondition


@dataclass(frozen=True, slots=True, kw_only=True)
class StationSettings:
    """A station's settings. In a creation request, None means "Memphis's default"."""

    name: str
    partitions_number: int | None = None
    retention_type: str | None = None
    retention_value: int | None = None
    storage_type: str | None = None
    replicas: int | None = None
    idempotency_window_ms: int | None = None
    schema_name: str | None = None
    dls_poison: bool | None = None
    dls_schemaverse: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionState:
    partition: int
    messages: int
    first_sequence: int
    last_sequence: int


class StationCatalog(Protocol):
    async def create_station(self, request: StationSettings) -> tuple[StationSettings, bool]:
        """The station's settings, and whether it was created (False: it existed with these settings).

        ALREADY_EXISTS if it exists with other settings."""

    async def list_stations(self) -> list[StationSettings]: ...

    async def describe_station(self, name: str) -> tuple[StationSettings, list[PartitionState]]:
        """NOT_FOUND if there is no such station."""

    async def delete_station(self, name: str) -> None:
        """NOT_FOUND if there is no such station."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaVersionState:
    version_number: int
    definition: str
    message_struct_name: str = ""
    descriptor: str = ""  # protobuf: base64 FileDescriptorSet
    created_by: str = ""
    created_at: float = 0.0  # seconds since the epoch (0: unknown)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaState:
    """A schema with its versions, oldest first (the last is active)."""

    name: str
    type: str
    versions: list[SchemaVersionState]
    stations: list[str]  # the stations enforcing it (filled by describe_schema only)


class SchemaCatalog(Protocol):
    async def create_schema(
        self, name: str, schema_type: str, definition: str, message_struct_name: str, created_by: str
    ) -> tuple[SchemaState, bool]:
        """The schema, and whether a version was added (False: the active one has this definition)."""

    async def list_schemas(self) -> list[SchemaState]: ...

    async def describe_schema(self, name: str) -> SchemaState:
        """NOT_FOUND if there is no such schema."""

    async def delete_schema(self, name: str) -> None:
        """NOT_FOUND if there is none; FAILED_PRECONDITION (HTTP 409) while a station enforces it."""

    async def attach_schema(self, station: str, schema_name: str) -> None:
        """NOT_FOUND if either is missing."""

    async def detach_schema(self, station: str) -> None:
        """NOT_FOUND if the station is missing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterState:
    id: int
    reason: str  # "poison" or "schema"
    data: bytes
    headers: dict[str, str]
    group: str = ""
    deliveries: int = 0
    partition: int = 0
    sequence: int = 0
    validation_error: str = ""
    producer_name: str = ""
    stored_at: float = 0.0  # seconds since the epoch


class DeadLetterStore(Protocol):
    async def list_dead_letters(self, station: str) -> list[DeadLetterState]:
        """Oldest first; NOT_FOUND if there is no such station."""

    async def resend_dead_letters(self, station: str, ids: list[int]) -> tuple[int, list[int]]:
        """(resent, the ids that are no dead letters of the station)."""

    async def purge_dead_letters(self, station: str) -> None: ...


NO_CATALOG = (
    "station and schema management needs the gateway's control plane: run with the embedded broker (no --broker) "
    "or with --control-plane on a NATS JetStream server; against a Memphis broker, manage them with Memphis"
)


class NoCatalog:
    """The catalog of a gateway in front of an external Memphis broker: there is none."""

    def _refuse(self) -> FailedPrecondition:
        return FailedPrecondition(NO_CATALOG)

    async def create_station(self, request: StationSettings) -> tuple[StationSettings, bool]:
        raise self._refuse()

    async def list_stations(self) -> list[StationSettings]:
        raise self._refuse()

    async def describe_station(self, name: str) -> tuple[StationSettings, list[PartitionState]]:
        raise self._refuse()

    async def delete_station(self, name: str) -> None:
        raise self._refuse()

    async def create_schema(
        self, name: str, schema_type: str, definition: str, message_struct_name: str, created_by: str
    ) -> tuple[SchemaState, bool]:
        raise self._refuse()

    async def list_schemas(self) -> list[SchemaState]:
        raise self._refuse()

    async def describe_schema(self, name: str) -> SchemaState:
        raise self._refuse()

    async def delete_schema(self, name: str) -> None:
        raise self._refuse()

    async def attach_schema(self, station: str, schema_name: str) -> None:
        raise self._refuse()

    async def detach_schema(self, station: str) -> None:
        raise self._refuse()

    async def list_dead_letters(self, station: str) -> list[DeadLetterState]:
        raise self._refuse()

    async def resend_dead_letters(self, station: str, ids: list[int]) -> tuple[int, list[int]]:
        raise self._refuse()

    async def purge_dead_letters(self, station: str) -> None:
        raise self._refuse()
