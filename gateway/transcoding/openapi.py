"""The OpenAPI 3.1 description of the REST API, generated from the protos' ``google.api.http`` rules.

:func:`openapi_document` walks the very :class:`~gateway.transcoding.bindings.Binding` objects the
transcoder serves (``build_bindings``), so the description cannot drift from the routes:

- a path per template (``{station}`` captures as path parameters, a custom verb kept as
  ``:verb``), an operation per binding (``operationId`` ``Service_Method``, ``_N`` for
  additional bindings, ``x-grpc-method`` the full gRPC name);
- query parameters for the fields a binding leaves to the query string (lowerCamel names, as
  docs/rest-api.md's ``?accountId=``); with ``query_with_body`` only the non-text fields, since a query
  string is logged by proxies and credentials belong in the body;
- request bodies from the request message (JSON Schema of the descriptor, the codec's rules:
  proto field names, 64-bit integers as JSON numbers, enums by name, maps as objects, bytes as
  base64 unless ``json_text``), minus the fields the path binds; a ``google.api.HttpBody``
  body field is a raw body with the media types its servicer accepts (:data:`RAW_BODY_TYPES`);
  client-streaming methods take ``application/x-ndjson`` (the schema is one line's);
- responses: 200 with the response message or its ``response_body`` field
  (``application/x-ndjson`` lines ``{"result": ...}`` for server streaming; ``text/event-stream``
  for ``STREAM_FORMAT_SSE``: one event's fields as the schema, its data's as ``contentSchema``, with
  the ``Last-Event-ID`` request header as a parameter), and the errors in
  the method's ``error_body`` shape: ``{"message"}``, ``{"error", "success"}`` or
  ``{"code", "message"}`` (every 401 is ``{"message": "Unauthorized"}``);
- security: a bearer JWT in ``Authorization`` or the ``authorization`` query parameter; public
  methods (``(memgw.v1.access).public``) have none.

:func:`openapi_route` serves the document at ``GET /openapi.json`` (public).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from memgw.v1 import options_pb2

from gateway.rpc.call import Endpoint
from gateway.transcoding import wkt
from gateway.transcoding.bindings import Binding, build_bindings
from gateway.transcoding.openapi_schemas import BINARY, TEXT, Schemas, messages_of, text_schema
from gateway.transcoding.pathtemplate import DeepWildcard, Literal, Variable, Wildcard
from gateway.transcoding.routes import ExtraRoute

__all__ = ["OPENAPI_PATH", "RAW_BODY_TYPES", "openapi_document", "openapi_route"]

OPENAPI_PATH = "/openapi.json"
NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
_F = FieldDescriptor
_ANY_JSON: dict[str, Any] = {}
# What the servicers accept in a google.api.HttpBody request (the descriptor cannot say it).
# Keyed by the method's full proto name; other HttpBody bodies are documented as any media type.
RAW_BODY_TYPES: dict[str, dict[str, dict[str, Any]]] = {
    "memgw.v1.ProduceService.ProduceSingle": {
        "text/*": {"schema": TEXT},
        "application/json": {"schema": _ANY_JSON},
        "application/x-protobuf": {"schema": BINARY},
    },
    "memgw.v1.ProduceService.ProduceBatch": {
        "application/json": {"schema": {"type": "array", "items": _ANY_JSON, "description": "one message per element"}},
    },
}
# Error details a method may answer instead of its error shape (named in the protos' comments).
_ERROR_DETAILS: dict[str, dict[str, str]] = {
    "memgw.v1.ProduceService.ProduceBatch": {"400": "memgw.v1.ProduceBatchFailure"},
    "memgw.v1.ProduceService.ProduceStream": {"400": "memgw.v1.ProduceBatchFailure"},
    "memgw.v1.MonitoringService.Status": {"503": "memgw.v1.StatusResponse"},
}
# The error bodies (gateway/rest.py error_body), by the method's memgw.v1.transcoding error_body.
_SHAPE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Status": {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        "required": ["code", "message"],
    },
    "ErrorMessage": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
    "ErrorSuccessFlag": {
        "type": "object",
        "properties": {"error": {"type": "string"}, "success": {"const": False}},
        "required": ["error", "success"],
    },
    "Unauthorized": {"type": "object", "properties": {"message": {"const": "Unauthorized"}}, "required": ["message"]},
}
_STATUS = {"$ref": "#/components/schemas/Status"}
_ERROR_SHAPES: dict[int, dict[str, Any]] = {
    options_pb2.ERROR_BODY_UNSPECIFIED: _STATUS,
    options_pb2.ERROR_BODY_MESSAGE: {"$ref": "#/components/schemas/ErrorMessage"},
    options_pb2.ERROR_BODY_SUCCESS_FLAG: {"$ref": "#/components/schemas/ErrorSuccessFlag"},
}
_UNAUTHORIZED = {"$ref": "#/components/schemas/Unauthorized"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 0}}}
_ERRORS = {
    "400": "a malformed request (what is wrong is in the body)",
    "413": "the body is larger than the gateway's max_body_bytes",
    "415": "the body's content type is not accepted",
    "429": "a limit is reached (rate, concurrent streams): retry after Retry-After seconds",
    "503": "the broker cannot be reached",
}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"query": []}]
_MAX_QUERY_DEPTH = 3


# ---------------------------------------------------------------- JSON Schema of messages


# ---------------------------------------------------------------- parameters


def _path_of(b: Binding) -> tuple[str, list[dict[str, Any]]]:
    """The OpenAPI path of a binding's template and its path parameters."""
    parts: list[str] = []
    params: list[dict[str, Any]] = []
    fields = dict(b.path_params)
    for i, seg in enumerate(b.template.template.segments):
        if isinstance(seg, Literal):
            parts.append(seg.value)
        elif isinstance(seg, Variable):
            leaf = fields[seg.field_path][-1]
            schema = text_schema(leaf)
            if leaf.is_repeated:
                schema = {"type": "array", "items": schema}
            multi = len(seg.segments) > 1 or isinstance(seg.segments[0], DeepWildcard)
            param: dict[str, Any] = {"name": seg.field_path, "in": "path", "required": True, "schema": schema}
            if multi:
                shape = "/".join("**" if isinstance(s, DeepWildcard) else "*" if isinstance(s, Wildcard) else s.value
                                 for s in seg.segments)
                param["description"] = f"matches {shape} (several path segments)"
            params.append(param)
            parts.append("{" + seg.field_path + "}")
        else:
            name = f"_{i}"
            params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                           "description": "any segment" if isinstance(seg, Wildcard) else "any segments"})
            parts.append("{" + name + "}")
    path = "/" + "/".join(parts)
    if b.template.verb:
        path += ":" + b.template.verb
    return path, params


def _query_params(b: Binding) -> list[dict[str, Any]]:
    if b.query is None:
        return []
    excluded = {tuple(f.name for f in p) for _, p in b.path_params}
    if b.body and b.body != "*":
        excluded.add((b.body,))
    if b.headers_field:
        excluded.add((b.headers_field,))
    out: list[dict[str, Any]] = []
    _collect_query(b.endpoint.method.input_type, (), (), excluded, b.query_with_body, out, 0)
    return out


def _collect_query(
    desc: Descriptor,
    names: tuple[str, ...],
    json_names: tuple[str, ...],
    excluded: set[tuple[str, ...]],
    no_text: bool,
    out: list[dict[str, Any]],
    depth: int,
) -> None:
    for fd in desc.fields:
        path, shown = (*names, fd.name), (*json_names, fd.json_name)
        if any(path[: len(ex)] == ex for ex in excluded) or fd.name == "authorization":
            continue
        message = fd.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"]
            if value.message_type is None and not no_text:
                out.append({"name": ".".join(shown), "in": "query", "style": "deepObject", "explode": True,
                            "schema": {"type": "object", "additionalProperties": text_schema(value)}})
            continue
        if message is not None and message.full_name not in wkt.TEXT and message.full_name not in wkt.WRAPPERS:
            if not fd.is_repeated and depth < _MAX_QUERY_DEPTH and not message.full_name.startswith("google."):
                _collect_query(message, path, shown, excluded, no_text, out, depth + 1)
            continue
        if no_text and (fd.type in (_F.TYPE_STRING, _F.TYPE_BYTES) or message is not None):
            continue
        schema = text_schema(fd)
        if fd.is_repeated:
            schema = {"type": "array", "items": schema}
        param: dict[str, Any] = {"name": ".".join(shown), "in": "query", "schema": schema}
        if fd.is_repeated:
            param.update(style="form", explode=True)
        if no_text:
            param["description"] = "used when the body leaves the field unset"
        out.append(param)


# ---------------------------------------------------------------- operations


def _request_body(b: Binding, schemas: Schemas) -> dict[str, Any] | None:
    if not b.body:
        return None
    req = b.endpoint.method.input_type
    method = b.endpoint.method.full_name
    if b.raw_body:
        content = RAW_BODY_TYPES.get(method, {"*/*": {"schema": BINARY}})
        return {"content": {k: dict(v) for k, v in content.items()}}
    if b.body == "*":
        path_fields = {p[0].name for _, p in b.path_params}
        schema = schemas.message(req, False, without=path_fields) if path_fields else schemas.ref(req, False)
    else:
        schema = schemas.field(req.fields_by_name[b.body], False)
    if b.endpoint.client_streaming:
        return {"description": "one JSON object per line", "content": {NDJSON: {"schema": schema}}}
    return {"content": {"application/json": {"schema": schema}}}


def _success(b: Binding, schemas: Schemas) -> dict[str, Any]:
    resp = b.endpoint.method.output_type
    if b.raw_response:
        return {"description": "the raw body", "content": {"*/*": {"schema": BINARY}}}
    if b.response_body:
        schema = schemas.field(resp.fields_by_name[b.response_body], True)
    else:
        schema = schemas.ref(resp, True)
    if b.sse:
        return {
            "description": (
                "server-sent events: a `retry:` line, then one event per message: `id:` the event id "
                f"(its {b.event_id_field}), `data:` the {b.response_body} as one line of JSON (contentSchema; "
                "an event without data carries the id only); a `: keep-alive` comment after 15 s of "
                'silence; a failure after the first event is `event: error` with `data: {"code", "message"}`'),
            # one event, as OpenAPI 3.2 describes text/event-stream (its itemSchema; 3.1 tools read it here)
            "content": {EVENT_STREAM: {"schema": {
                "type": "object",
                "properties": {
                    "data": {"type": "string", "contentMediaType": "application/json",
                             "contentSchema": {"anyOf": [schema, _STATUS]}},
                    "event": {"type": "string", "enum": ["message", "error"]},
                    "id": {"type": "string"},
                    "retry": {"type": "integer", "minimum": 0},
                },
            }}},
        }
    if b.endpoint.server_streaming:
        line = {
            "type": "object",
            "properties": {"result": schema, "error": _STATUS},
            "minProperties": 1,
            "maxProperties": 1,
        }
        return {"description": 'one JSON object per line: {"result": ...}, a failure as {"error": ...}',
                "content": {NDJSON: {"schema": line}}}
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _errors(b: Binding, schemas: Schemas) -> dict[str, Any]:
    shape = _ERROR_SHAPES.get(b.error_body, _STATUS)
    details = _ERROR_DETAILS.get(b.endpoint.method.full_name, {})
    out: dict[str, Any] = {}
    for status, why in _ERRORS.items():
        if status == "413" and not b.body:
            continue
        if status == "415" and not b.raw_body:
            continue
        schema: dict[str, Any] = shape
        if status in details:
            detail = b.endpoint.method.containing_service.file.pool.FindMessageTypeByName(details[status])
            schema = {"anyOf": [shape, schemas.ref(detail, True)]}
        response: dict[str, Any] = {"description": why, "content": {"application/json": {"schema": schema}}}
        if status in ("429", "503"):
            response["headers"] = _RETRY_AFTER
        out[status] = response
    if not b.endpoint.public:
        out["401"] = {
            "description": "no token, or one that is not a valid access token",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": _UNAUTHORIZED}},
        }
    out["default"] = {"description": "any other error", "content": {"application/json": {"schema": shape}}}
    return out


def _operation(b: Binding, schemas: Schemas, path_params: list[dict[str, Any]]) -> dict[str, Any]:
    ep = b.endpoint
    op_id = f"{ep.service.name}_{ep.method.name}" + (f"_{b.index}" if b.index else "")
    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": [ep.service.name],
        "summary": f"{ep.service.full_name}.{ep.method.name}",
        "x-grpc-method": ep.full_name or f"/{ep.service.full_name}/{ep.method.name}",
    }
    params = [*path_params, *_query_params(b)]
    if b.sse:
        params.append({"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                       "description": "resume after this event id (what EventSource sends when it reconnects)"})
    if params:
        op["parameters"] = params
    body = _request_body(b, schemas)
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {"200": _success(b, schemas), **_errors(b, schemas)}
    op["security"] = [] if ep.public else _SECURITY
    return op


def openapi_document(
    endpoints: Iterable[Endpoint],
    *,
    title: str = "memphis-gateway",
    version: str = "1",
    allow_delete_body: bool = False,
    unbound_methods: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every bound RPC of ``endpoints`` (and of /openapi.json)."""
    bindings = build_bindings(endpoints, allow_delete_body=allow_delete_body, unbound_methods=unbound_methods)
    requests: set[str] = set()
    responses: set[str] = set()
    for b in bindings:
        messages_of(b.endpoint.method.input_type, requests)
        messages_of(b.endpoint.method.output_type, responses)
    schemas = Schemas(requests & responses)
    paths: dict[str, dict[str, Any]] = {}
    for b in bindings:
        path, path_params = _path_of(b)
        item = paths.setdefault(path, {})
        method = b.http_method.lower()
        if method not in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            item.setdefault("x-custom-methods", {})[b.http_method] = _operation(b, schemas, path_params)
            continue
        item[method] = _operation(b, schemas, path_params)
    paths.setdefault(OPENAPI_PATH, {})["get"] = {
        "operationId": "OpenAPI",
        "summary": "this document",
        "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {
            "type": "object"}}}}},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "REST transcoding of the gateway's gRPC services (generated from their google.api.http "
            "rules). Token: Authorization: Bearer <jwt> from POST /auth/authenticate, or ?authorization=<jwt>.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted({**schemas.components, **_SHAPE_SCHEMAS}.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "query": {"type": "apiKey", "in": "query", "name": "authorization"},
            },
        },
    }


def openapi_route(endpoints: Iterable[Endpoint], **options: Any) -> ExtraRoute:
    """``GET /openapi.json``: the document of ``endpoints``, built once (public, like /monitoring/status)."""
    body = orjson.dumps(openapi_document(endpoints, **options))

    async def handler(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return ExtraRoute(method="GET", template=OPENAPI_PATH, handler=handler)
