"""Writing answers: error bodies by the method's shape, reply encoders, the status table's HTTP side.

Errors take the method's ``(memgw.v1.transcoding).error_body`` shape (:func:`error_body`),
except that every 401 is ``{"message": "Unauthorized"}`` (docs/rest-api.md) and that an error
carrying a detail message is rendered as that message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf.message import Message
from memgw.v1 import options_pb2

from gateway.core import jsonbytes
from gateway.core.errors import GatewayError, Unauthenticated
from gateway.transcoding.bindings import Binding
from gateway.transcoding.jsoncodec import dumps

JSON = "application/json"
NDJSON = "application/x-ndjson"
_MESSAGE = options_pb2.ERROR_BODY_MESSAGE
_SUCCESS_FLAG = options_pb2.ERROR_BODY_SUCCESS_FLAG


def error_body(err: GatewayError, shape: int) -> bytes:
    """The JSON body of ``err``: its detail if it has one, else the method's ``ErrorBody`` shape.

    ``ERROR_BODY_MESSAGE`` is ``{"message": m}`` (also every UNAUTHENTICATED, as docs/rest-api.md wants),
    ``ERROR_BODY_SUCCESS_FLAG`` ``{"error": m, "success": false}``, unspecified grpc-gateway's
    ``{"code": <grpc code>, "message": m}``.
    """
    if err.detail is not None:
        return dumps(err.detail)
    if isinstance(err, Unauthenticated):  # docs/rest-api.md: every 401 is {"message": "Unauthorized"}, + why
        return orjson.dumps({"message": err.message, "reason": err.why})
    if shape == _MESSAGE or err.code == grpc.StatusCode.UNAUTHENTICATED:
        return orjson.dumps({"message": err.message})
    if shape == _SUCCESS_FLAG:
        return orjson.dumps({"error": err.message, "success": False})
    return orjson.dumps({"code": err.code.value[0], "message": err.message})


def www_authenticate(err: GatewayError) -> str:
    """RFC 6750 section 3: no error code when the request carried no token at all."""
    if not isinstance(err, Unauthenticated) or err.why == "no token":
        return 'Bearer realm="memphis-gateway"'
    return f'Bearer realm="memphis-gateway", error="invalid_token", error_description="{err.why}"'


def error_response(err: GatewayError, shape: int, headers: dict[str, str] | None = None) -> web.Response:
    """An error as an HTTP response: status from the status table, WWW-Authenticate, Retry-After."""
    out = {"Content-Type": JSON}
    if headers:
        out.update(headers)
    if err.http_status == 401:
        out["WWW-Authenticate"] = www_authenticate(err)
    if err.retry_after is not None:
        out["Retry-After"] = str(max(0, math.ceil(err.retry_after)))
    return web.Response(status=err.http_status, body=error_body(err, shape), headers=out)


def encoder(b: Binding) -> Callable[[Message], tuple[bytes, str]]:
    """reply -> (body, content type or "" for the binding's default)."""
    field_name = b.response_body
    codec = b.response_codec
    if b.raw_response:

        def raw(reply: Message) -> tuple[bytes, str]:
            part: Any = getattr(reply, field_name) if field_name else reply
            return part.data, part.content_type

        return raw
    if field_name:
        return lambda reply: (jsonbytes.dumps(codec.field_to_obj(reply, field_name)), JSON)
    return lambda reply: (codec.dumps(reply), JSON)
