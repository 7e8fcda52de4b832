"""The OpenAPI description (gateway.transcoding.openapi): valid OpenAPI 3.1, every bound RPC, the codec's JSON shapes.

Checked on the product's contract and on the echo test contract of test_httprules.py (maps, enums,
wrappers, verbs, ``**``, HttpBody both ways, streaming). The meta-schema is the OpenAPI 3.1 one
schemathesis ships; the message schemas are also checked as JSON Schema 2020-12, and what the
codec emits for sample responses must validate against the response schemas.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from aiohttp import web
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from memgw.v1 import consume_pb2, monitoring_pb2, produce_pb2
from referencing import Registry, Resource
from schemathesis.specs.openapi.definitions import OPENAPI_31

from gateway.rpc.call import Endpoint, build_endpoints
from gateway.rpc.contract import SERVICES
from gateway.transcoding.bindings import build_bindings
from gateway.transcoding.jsoncodec import codec_for
from gateway.transcoding.openapi import openapi_document, openapi_route
from gateway.transcoding.server import RestOptions, build_rest_handler, rest_runner
from tests.unit.test_httprules import AdmitAll, AnyMethod, message_class, service

OPERATIONS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def contract_endpoints() -> list[Endpoint]:
    return build_endpoints(SERVICES, [AnyMethod(s.full_name) for s in SERVICES], AdmitAll())


def echo_endpoints() -> list[Endpoint]:
    svc = service("EchoService")
    return build_endpoints([svc], [AnyMethod(svc.full_name)], AdmitAll())


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """operationId -> operation, with "_path" and "_method" added."""
    out = {}
    for path, item in doc["paths"].items():
        for method, op in [*((m, o) for m, o in item.items() if m in OPERATIONS),
                           *item.get("x-custom-methods", {}).items()]:
            out[op["operationId"]] = {**op, "_path": path, "_method": method}
    return out


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` refs resolve into ``doc``."""
    registry: Registry = Registry().with_resource("urn:doc", Resource.from_contents(
        {**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))
    rebased = orjson.loads(orjson.dumps(schema).replace(b'"#/components', b'"urn:doc#/components'))
    return jsonschema.Draft202012Validator(rebased, registry=registry)


@pytest.mark.parametrize("endpoints", [contract_endpoints, echo_endpoints], ids=["contract", "echo"])
def test_document_is_valid_openapi_31(endpoints: Any) -> None:
    doc = orjson.loads(orjson.dumps(openapi_document(endpoints(), unbound_methods=False)))
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # every $ref points at something
    text = orjson.dumps(doc).decode()
    for ref in {part.split('"')[0] for part in text.split('"$ref":"#/components/schemas/')[1:]}:
        assert ref in doc["components"]["schemas"], ref


@pytest.mark.parametrize("endpoints", [contract_endpoints, echo_endpoints], ids=["contract", "echo"])
def test_every_bound_rpc_is_listed(endpoints: Any) -> None:
    eps = endpoints()
    doc = openapi_document(eps)
    ops = operations(doc)
    bindings = build_bindings(eps)
    listed = {(op["_method"].upper(), op["x-grpc-method"]) for op in ops.values() if "x-grpc-method" in op}
    assert listed == {(b.http_method, b.endpoint.full_name) for b in bindings}
    assert len([op for op in ops.values() if "x-grpc-method" in op]) == len(bindings)
    print(f"\nOpenAPI: {len(bindings)} bindings of {len(eps)} RPCs -> {len(ops)} operations")


def test_contract_operations() -> None:
    doc = openapi_document(contract_endpoints())
    ops = operations(doc)
    assert set(ops) == {
        "AuthService_Authenticate", "AuthService_RefreshToken", "ProduceService_ProduceSingle",
        "ProduceService_ProduceBatch", "ProduceService_ProduceStream", "ConsumeService_ConsumeBatch",
        "ConsumeService_Ack", "ConsumeService_Subscribe", "ConsumeService_ConsumeEvents", "MonitoringService_Status",
        "MonitoringService_GetResourcesUtilization", "OpenAPI",
        "UserService_CreateUser", "UserService_ListUsers", "UserService_GetUser", "UserService_DeleteUser",
        "ApiKeyService_CreateApiKey", "ApiKeyService_ListApiKeys", "ApiKeyService_DeleteApiKey",
        "StationService_CreateStation", "StationService_ListStations", "StationService_GetStation",
        "StationService_DeleteStation",
        "SchemaService_CreateSchema", "SchemaService_ListSchemas", "SchemaService_GetSchema",
        "SchemaService_DeleteSchema", "SchemaService_AttachSchema", "SchemaService_DetachSchema",
        "DeadLetterService_ListDeadLetters", "DeadLetterService_ResendDeadLetters",
        "DeadLetterService_PurgeDeadLetters",
    }  # fmt: skip
    single = ops["ProduceService_ProduceSingle"]
    assert single["_path"] == "/stations/{station}/produce/single" and single["_method"] == "post"
    assert single["parameters"] == [
        {"name": "station", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "idempotencyKey", "in": "query", "schema": {"type": "string"}},
        {"name": "partitionKey", "in": "query", "schema": {"type": "string"}},
        {"name": "producerName", "in": "query", "schema": {"type": "string"}},
    ]
    assert set(single["requestBody"]["content"]) == {"text/*", "application/json", "application/x-protobuf"}
    assert {"400", "401", "413", "415", "429", "503"} <= set(single["responses"])
    assert single["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorSuccessFlag"}
    assert single["security"] == [{"bearer": []}, {"query": []}]
    batch = ops["ProduceService_ProduceBatch"]
    assert batch["requestBody"]["content"]["application/json"]["schema"]["type"] == "array"
    assert "ProduceBatchFailure" in orjson.dumps(batch["responses"]["400"]).decode()
    auth = ops["AuthService_Authenticate"]
    assert auth["security"] == [] and "401" not in auth["responses"]
    assert auth["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorMessage"}
    assert [p["name"] for p in auth["parameters"]] == ["accountId", "tokenExpiryInMinutes",
                                                       "refreshTokenExpiryInMinutes"]  # never the password
    consume = ops["ConsumeService_ConsumeBatch"]
    body = consume["requestBody"]["content"]["application/json"]["schema"]
    assert "station" not in body["properties"] and "consumer_name" in body["properties"]
    assert body["properties"]["ack_mode"]["enum"] == ["ACK_MODE_UNSPECIFIED", "ACK_MODE_EXPLICIT"]
    ok = consume["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["type"] == "array"  # response_body: "messages"
    assert "415" not in consume["responses"]
    stream = ops["ConsumeService_Subscribe"]
    assert set(stream["responses"]["200"]["content"]) == {"application/x-ndjson"}
    assert set(ops["ProduceService_ProduceStream"]["requestBody"]["content"]) == {"application/x-ndjson"}
    # server-sent events: text/event-stream (never application/json), the event data's schema beside it
    sse = ops["ConsumeService_ConsumeEvents"]
    assert sse["_path"] == "/stations/{station}/consume/sse" and sse["_method"] == "get"
    ok = sse["responses"]["200"]["content"]
    event = ok["text/event-stream"]["schema"]  # one event (OpenAPI 3.2's itemSchema), as schemathesis checks it
    assert set(ok) == {"text/event-stream"} and event["type"] == "object"
    assert set(event["properties"]) == {"data", "event", "id", "retry"}
    assert "ConsumedMessage" in orjson.dumps(event["properties"]["data"]["contentSchema"]).decode()
    assert "keep-alive" in sse["responses"]["200"]["description"]
    names = {p["name"]: p["in"] for p in sse["parameters"]}
    assert names["Last-Event-ID"] == "header" and names["consumerName"] == "query" and names["decode"] == "query"
    status = ops["MonitoringService_Status"]
    assert status["security"] == [] and "requestBody" not in status and "413" not in status["responses"]
    assert "StatusResponse" in orjson.dumps(status["responses"]["503"]).decode()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["query"] == {"type": "apiKey", "in": "query", "name": "authorization"}
    assert schemes["bearer"]["scheme"] == "bearer"
    messages = doc["components"]["schemas"]["memgw.v1.AuthenticateResponse"]
    assert messages["properties"]["expires_in"] == {
        "type": "integer", "format": "uint64", "minimum": 0, "maximum": 2**64 - 1}
    assert messages["required"] == ["expires_in", "jwt", "jwt_refresh_token", "refresh_token_expires_in"]


def test_echo_contract_shapes() -> None:
    doc = openapi_document(echo_endpoints())
    ops = operations(doc)
    assert ops["EchoService_Get_1"]["_path"] == "/v1/echo/{id}/n/{n32}"
    assert ops["EchoService_Get_2"]["_path"] == "/v1/echo:search"
    assert ops["EchoService_Publish"]["_path"] == "/v1/{inner.name}:publish"
    assert "topics/*" in ops["EchoService_Publish"]["parameters"][0]["description"]
    typed = {p["name"]: p["schema"] for p in ops["EchoService_Typed"]["parameters"] if p["in"] == "path"}
    assert typed["tags"] == {"type": "array", "items": {"type": "string"}}
    assert typed["flag"] == {"type": "boolean"} and typed["color"]["enum"] == ["COLOR_UNSPECIFIED", "RED", "GREEN"]
    assert typed["when"]["format"] == "date-time"
    query = {p["name"]: p for p in ops["EchoService_Get"]["parameters"] if p["in"] == "query"}
    assert {"n32", "u64", "inner.name", "inner.big", "tags", "labels", "when", "wrapped"} <= set(query)
    assert "authorization" not in query and "id" not in query and "headers" in query  # no headers_field here
    assert query["labels"]["style"] == "deepObject" and query["tags"]["explode"] is True
    assert ops["EchoService_Custom"]["_method"] == "SEARCH"
    assert set(ops["EchoService_Upload"]["requestBody"]["content"]) == {"*/*"}
    assert set(ops["EchoService_Download"]["responses"]["200"]["content"]) == {"*/*"}
    update = ops["EchoService_Update"]
    assert update["requestBody"]["content"]["application/json"]["schema"]["type"] == "object"  # body: "labels"
    assert update["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorMessage")
    schemas = doc["components"]["schemas"]
    # EchoRequest is both a request and (inside EchoResponse) a response type: two entries
    assert {"memgw.testing.v1.EchoRequestInput", "memgw.testing.v1.EchoRequestOutput"} <= set(schemas)
    echo_in = schemas["memgw.testing.v1.EchoRequestInput"]["properties"]
    assert echo_in["by_num"]["propertyNames"] == {"pattern": "^-?[0-9]+$"}
    assert echo_in["flags"]["propertyNames"] == {"enum": ["true", "false"]}
    assert echo_in["text"]["type"] == "string" and echo_in["blob"]["format"] == "byte"
    assert echo_in["nothing"] == {"type": "null"} and echo_in["wrapped"]["format"] == "int64"


def _filled_echo() -> Any:
    Echo, Inner = message_class("EchoRequest"), message_class("Inner")
    return Echo(
        id="x", n32=-3, u64=2**64 - 1, flag=True, ratio=float("nan"), color=1, inner=Inner(name="n", big=-(2**63)),
        tags=["a"], labels={"k": "v"}, blob=b"\x00\xff", when=timestamp_pb2.Timestamp(seconds=5), a="one",
        nums=[1, 2], maybe="m", by_num={7: Inner(tags=["t"])}, extra=struct_pb2.Struct(fields={
            "z": struct_pb2.Value(number_value=1)}), text=b"hi", inners=[Inner()], f32=1.5, s32=-1,
        span=duration_pb2.Duration(seconds=3, nanos=500), flags={True: "y"},
        any_value=struct_pb2.Value(string_value="s"), headers={"h": "v"},
    )  # fmt: skip


def test_codec_output_validates_against_the_response_schemas() -> None:
    """What the codec emits is what the document says (default and filled messages)."""
    doc = orjson.loads(orjson.dumps(openapi_document([*contract_endpoints(), *echo_endpoints()])))
    schemas = doc["components"]["schemas"]
    EchoResponse = message_class("EchoResponse")
    samples = [
        ("memgw.v1.AuthenticateResponse", None),
        ("memgw.v1.ProduceSingleResponse", produce_pb2.ProduceSingleResponse(success=True)),
        ("memgw.v1.ProduceBatchFailure", produce_pb2.ProduceBatchFailure(errors=["e"], fail=1, sent=2)),
        ("memgw.v1.StatusResponse", monitoring_pb2.StatusResponse(status="unavailable", reason="down")),
        ("memgw.v1.GetResourcesUtilizationResponse", monitoring_pb2.GetResourcesUtilizationResponse(cpu=1.5)),
        ("memgw.v1.ConsumedMessage", consume_pb2.ConsumedMessage(message=b'{"a": 1}', headers={"k": "v"}, ack_id="1")),
        ("memgw.testing.v1.EchoResponse", EchoResponse(echo=_filled_echo(), items=["i"])),
        ("memgw.testing.v1.EchoResponse", EchoResponse()),
    ]  # fmt: skip
    for name, msg in samples:
        key = name if name in schemas else name + "Output"
        cls = message_class(name.rpartition(".")[2]) if name.startswith("memgw.testing") else None
        if msg is None:
            from memgw.v1 import auth_pb2

            msg = auth_pb2.AuthenticateResponse()
        obj = orjson.loads(codec_for(msg).dumps(msg))
        validator(doc, {"$ref": f"#/components/schemas/{key}"}).validate(obj)
        assert cls is None or isinstance(msg, cls)
    # and a response the codec would never emit does not validate
    bad = {"expires_in": "900000", "jwt": "j", "jwt_refresh_token": "r", "refresh_token_expires_in": 1}
    with pytest.raises(jsonschema.ValidationError):
        validator(doc, {"$ref": "#/components/schemas/memgw.v1.AuthenticateResponse"}).validate(bad)


async def test_served_at_openapi_json() -> None:
    eps = contract_endpoints()
    app = build_rest_handler(eps, RestOptions(extra_routes=(openapi_route(eps),)))
    runner = rest_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/openapi.json") as resp:  # no token needed
                assert resp.status == 200 and resp.content_type == "application/json"
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                served = await resp.json()
            async with http.post(f"http://127.0.0.1:{port}/openapi.json") as resp:
                assert resp.status == 405
    finally:
        await runner.cleanup()
    assert served == orjson.loads(orjson.dumps(openapi_document(eps)))
