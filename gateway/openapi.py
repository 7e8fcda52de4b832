"""The OpenAPI 3.1 description of the REST API, generated from the protos' ``google.api.http`` rules.

:func:`openapi_document` walks the very :class:`~gateway.httprules.Binding` objects the
transcoder serves (``build_bindings``), so the description cannot drift from the routes:

- a path per template (``{station}`` captures as path parameters, a custom verb kept as
  ``:verb``), an operation per binding (``operationId`` ``Service_Method``, ``_N`` for
  additional bindings, ``x-grpc-method`` the full gRPC name);
- query parameters for the fields a binding leaves to the query string (lowerCamel names, as
  API.md's ``?accountId=``); with ``query_with_body`` only the non-text fields, since a query
  string is logged by proxies and credentials belong in the body;
- request bodies from the request message (JSON Schema of the descriptor, the codec's rules:
  proto field names, 64-bit integers as JSON numbers, enums by name, maps as objects, bytes as
  base64 unless ``json_text``), minus the fields the path binds; a ``google.api.HttpBody``
  body field is a raw body with the media types its servicer accepts (:data:`RAW_BODY_TYPES`);
  client-streaming methods take ``application/x-ndjson`` (the schema is one line's);
- responses: 200 with the response message or its ``response_body`` field
  (``application/x-ndjson`` lines ``{"result": ...}`` for server streaming), and the errors in
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

from gateway.calls import Endpoint
from gateway.httprules import Binding, build_bindings
from gateway.jsoncodec import INT_RANGES
from gateway.pathtemplate import DeepWildcard, Literal, Variable, Wildcard
from gateway.rest import ExtraRoute

__all__ = ["OPENAPI_PATH", "RAW_BODY_TYPES", "openapi_document", "openapi_route"]

OPENAPI_PATH = "/openapi.json"
NDJSON = "application/x-ndjson"
_F = FieldDescriptor
_TEXT = {"type": "string"}
_BINARY = {"type": "string", "format": "binary"}
_ANY_JSON: dict[str, Any] = {}
# What the servicers accept in a google.api.HttpBody request (the descriptor cannot say it).
# Keyed by the method's full proto name; other HttpBody bodies are documented as any media type.
RAW_BODY_TYPES: dict[str, dict[str, dict[str, Any]]] = {
    "memgw.v1.ProduceService.ProduceSingle": {
        "text/*": {"schema": _TEXT},
        "application/json": {"schema": _ANY_JSON},
        "application/x-protobuf": {"schema": _BINARY},
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
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}, "required": ["@type"]},
}
_TEXT_WKT = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"})
_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_FLOAT = {"anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}
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


class _Schemas:
    """JSON Schemas of message types, as ``components/schemas`` entries, for requests or responses.

    Request schemas take what the codec accepts (no field is required, unknown keys are
    ignored); response schemas say what it emits (every field without presence, nothing else).
    A type used both ways gets two entries, ``<name>Input`` and ``<name>Output``.
    """

    def __init__(self, both_ways: set[str]) -> None:
        self.components: dict[str, Any] = {}
        self._both_ways = both_ways

    def ref(self, desc: Descriptor, response: bool) -> dict[str, Any]:
        name = desc.full_name
        if name in _WKT:
            return dict(_WKT[name])
        if name in _WRAPPERS:
            return self.field(desc.fields_by_name["value"], response)
        key = name + ("Output" if response else "Input") if name in self._both_ways else name
        if key not in self.components:
            self.components[key] = {}  # placeholder: recursive types refer to it
            self.components[key] = self.message(desc, response)
        return {"$ref": f"#/components/schemas/{key}"}

    def message(self, desc: Descriptor, response: bool, *, without: Iterable[str] = ()) -> dict[str, Any]:
        skip = set(without)
        properties = {f.name: self.field(f, response) for f in desc.fields if f.name not in skip}
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if response:
            schema["required"] = [f.name for f in desc.fields if not f.has_presence and f.name not in skip]
            schema["additionalProperties"] = False
        oneofs = [o for o in desc.oneofs if len(o.fields) > 1]
        if oneofs and not response:
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.name for f in o.fields)}" for o in oneofs
            )
        return schema

    def field(self, fd: FieldDescriptor, response: bool) -> dict[str, Any]:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.single(value, response)}
            if key.type == _F.TYPE_BOOL:
                schema["propertyNames"] = {"enum": ["true", "false"]}
            elif key.type != _F.TYPE_STRING:
                schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
            return schema
        if fd.is_repeated:
            return {"type": "array", "items": self.single(fd, response)}
        return self.single(fd, response)

    def single(self, fd: FieldDescriptor, response: bool) -> dict[str, Any]:
        """The schema of one value of ``fd`` (an element if repeated)."""
        if fd.message_type is not None:
            return self.ref(fd.message_type, response)
        return scalar_schema(fd)


def scalar_schema(fd: FieldDescriptor) -> dict[str, Any]:
    t = fd.type
    if t in INT_RANGES:
        lo, hi, name = INT_RANGES[t]
        return {"type": "integer", "format": name, "minimum": lo, "maximum": hi}
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return dict(_FLOAT)
    if t == _F.TYPE_BOOL:
        return {"type": "boolean"}
    if t == _F.TYPE_STRING:
        return {"type": "string"}
    if t == _F.TYPE_BYTES:
        if fd.GetOptions().Extensions[options_pb2.json_text]:
            return {"type": "string", "description": "UTF-8 text"}
        return {"type": "string", "format": "byte", "contentEncoding": "base64"}
    if t == _F.TYPE_ENUM:
        if fd.enum_type.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        return {"type": "string", "enum": [v.name for v in fd.enum_type.values], "description": "or its number"}
    return {}


def _messages_of(desc: Descriptor, seen: set[str]) -> set[str]:
    if desc.full_name in seen:
        return seen
    seen.add(desc.full_name)
    for fd in desc.fields:
        if fd.message_type is not None:
            _messages_of(fd.message_type, seen)
    return seen


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
            schema = _text_schema(leaf)
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


def _text_schema(fd: FieldDescriptor) -> dict[str, Any]:
    """The schema of a field given as text (path captures, query values)."""
    if fd.message_type is not None:
        name = fd.message_type.full_name
        if name in _WRAPPERS:
            return _text_schema(fd.message_type.fields_by_name["value"])
        return dict(_WKT.get(name, _TEXT)) if name in _TEXT_WKT else {"type": "string"}
    if fd.type == _F.TYPE_ENUM and fd.enum_type.full_name == "google.protobuf.NullValue":
        return {"type": "string", "enum": ["NULL_VALUE"]}
    return scalar_schema(fd)


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
                            "schema": {"type": "object", "additionalProperties": _text_schema(value)}})
            continue
        if message is not None and message.full_name not in _TEXT_WKT and message.full_name not in _WRAPPERS:
            if not fd.is_repeated and depth < _MAX_QUERY_DEPTH and not message.full_name.startswith("google."):
                _collect_query(message, path, shown, excluded, no_text, out, depth + 1)
            continue
        if no_text and (fd.type in (_F.TYPE_STRING, _F.TYPE_BYTES) or message is not None):
            continue
        schema = _text_schema(fd)
        if fd.is_repeated:
            schema = {"type": "array", "items": schema}
        param: dict[str, Any] = {"name": ".".join(shown), "in": "query", "schema": schema}
        if fd.is_repeated:
            param.update(style="form", explode=True)
        if no_text:
            param["description"] = "used when the body leaves the field unset"
        out.append(param)


# ---------------------------------------------------------------- operations


def _request_body(b: Binding, schemas: _Schemas) -> dict[str, Any] | None:
    if not b.body:
        return None
    req = b.endpoint.method.input_type
    method = b.endpoint.method.full_name
    if b.raw_body:
        content = RAW_BODY_TYPES.get(method, {"*/*": {"schema": _BINARY}})
        return {"content": {k: dict(v) for k, v in content.items()}}
    if b.body == "*":
        path_fields = {p[0].name for _, p in b.path_params}
        schema = schemas.message(req, False, without=path_fields) if path_fields else schemas.ref(req, False)
    else:
        schema = schemas.field(req.fields_by_name[b.body], False)
    if b.endpoint.client_streaming:
        return {"description": "one JSON object per line", "content": {NDJSON: {"schema": schema}}}
    return {"content": {"application/json": {"schema": schema}}}


def _success(b: Binding, schemas: _Schemas) -> dict[str, Any]:
    resp = b.endpoint.method.output_type
    if b.raw_response:
        return {"description": "the raw body", "content": {"*/*": {"schema": _BINARY}}}
    if b.response_body:
        schema = schemas.field(resp.fields_by_name[b.response_body], True)
    else:
        schema = schemas.ref(resp, True)
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


def _errors(b: Binding, schemas: _Schemas) -> dict[str, Any]:
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


def _operation(b: Binding, schemas: _Schemas, path_params: list[dict[str, Any]]) -> dict[str, Any]:
    ep = b.endpoint
    op_id = f"{ep.service.name}_{ep.method.name}" + (f"_{b.index}" if b.index else "")
    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": [ep.service.name],
        "summary": f"{ep.service.full_name}.{ep.method.name}",
        "x-grpc-method": ep.full_name or f"/{ep.service.full_name}/{ep.method.name}",
    }
    params = [*path_params, *_query_params(b)]
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
        _messages_of(b.endpoint.method.input_type, requests)
        _messages_of(b.endpoint.method.output_type, responses)
    schemas = _Schemas(requests & responses)
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
