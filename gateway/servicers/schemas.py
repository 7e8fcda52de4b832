"""SchemaService: Schemaverse schemas and which station enforces which, in the gateway's catalog."""

from __future__ import annotations

from datetime import UTC, datetime

from memgw.v1 import schemas_pb2

from gateway.broker.catalogseam import SchemaCatalog, SchemaState, SchemaVersionState
from gateway.core.errors import InvalidArgument
from gateway.rpc.call import CallContext


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else ""


def version_message(v: SchemaVersionState) -> schemas_pb2.SchemaVersion:
    return schemas_pb2.SchemaVersion(
        version_number=v.version_number, definition=v.definition, message_struct_name=v.message_struct_name,
        descriptor=v.descriptor, created_by=v.created_by, created_at=_time(v.created_at),
    )


def schema_message(s: SchemaState) -> schemas_pb2.Schema:
    active = version_message(s.versions[-1]) if s.versions else None
    return schemas_pb2.Schema(name=s.name, type=s.type, active_version=active)


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


class SchemaService:
    SERVICE = "memgw.v1.SchemaService"

    def __init__(self, catalog: SchemaCatalog) -> None:
        self._catalog = catalog

    async def CreateSchema(
        self, request: schemas_pb2.CreateSchemaRequest, ctx: CallContext
    ) -> schemas_pb2.CreateSchemaResponse:
        principal = ctx.require_principal()
        schema, created = await self._catalog.create_schema(
            _required(request.name, "name"),
            _required(request.type, "type (json, avro, graphql or protobuf)").lower(),
            _required(request.definition, "definition"),
            request.message_struct_name,
            principal.username,
        )
        return schemas_pb2.CreateSchemaResponse(success=True, created=created, schema=schema_message(schema))

    async def ListSchemas(
        self, request: schemas_pb2.ListSchemasRequest, ctx: CallContext
    ) -> schemas_pb2.ListSchemasResponse:
        ctx.require_principal()
        schemas = await self._catalog.list_schemas()
        return schemas_pb2.ListSchemasResponse(success=True, schemas=[schema_message(s) for s in schemas])

    async def GetSchema(self, request: schemas_pb2.GetSchemaRequest, ctx: CallContext) -> schemas_pb2.GetSchemaResponse:
        ctx.require_principal()
        schema = await self._catalog.describe_schema(_required(request.name, "name"))
        return schemas_pb2.GetSchemaResponse(
            success=True, name=schema.name, type=schema.type,
            versions=[version_message(v) for v in schema.versions], stations=schema.stations,
        )

    async def DeleteSchema(
        self, request: schemas_pb2.DeleteSchemaRequest, ctx: CallContext
    ) -> schemas_pb2.DeleteSchemaResponse:
        ctx.require_principal()
        await self._catalog.delete_schema(_required(request.name, "name"))
        return schemas_pb2.DeleteSchemaResponse(success=True)

    async def AttachSchema(
        self, request: schemas_pb2.AttachSchemaRequest, ctx: CallContext
    ) -> schemas_pb2.AttachSchemaResponse:
        ctx.require_principal()
        await self._catalog.attach_schema(_required(request.station, "station"), _required(request.name, "name"))
        return schemas_pb2.AttachSchemaResponse(success=True)

    async def DetachSchema(
        self, request: schemas_pb2.DetachSchemaRequest, ctx: CallContext
    ) -> schemas_pb2.DetachSchemaResponse:
        ctx.require_principal()
        await self._catalog.detach_schema(_required(request.station, "station"))
        return schemas_pb2.DetachSchemaResponse(success=True)
