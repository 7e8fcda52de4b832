"""The REST transcoder: HTTP requests -> Endpoint calls, by the protos' ``google.api.http`` rules.

aiohttp's low-level server hands every request to our own dispatcher (grpc-gateway's ``ServeMux``):
the first binding, in declaration order, whose method and template match wins;
a path that matches only under another method is 405, anything else 404, both
with grpc-gateway's ``{"code": ..., "message": ...}`` body. Non-RPC routes
(``RestOptions.extra_routes``) use the same template syntax, after the RPCs.

Per request: the message is built from the body (``*``, a field, or raw bytes for a
``google.api.HttpBody``), then the path captures, then the query string; the
request headers fill ``transcoding.headers_field``; a :class:`CallContext` carries
the lower-cased headers as metadata. Unary and client-streaming (NDJSON body)
methods answer one JSON document; server-streaming methods answer NDJSON lines
``{"result": ...}``, a failure after the first line being a last ``{"error": ...}``
line. Errors take the method's ``transcoding.error_body`` shape (see
:func:`error_body`), except that every 401 is ``{"message": "Unauthorized"}`` (API.md)
and that an error carrying a detail message is rendered as that message; nothing a
client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf.message import Message
from memgw.v1 import options_pb2

from gateway.calls import CallContext, Endpoint
from gateway.errors import GatewayError, Internal, InvalidArgument
from gateway.httprules import Binding, build_bindings
from gateway.jsoncodec import dumps
from gateway.pathtemplate import MalformedPathError, PathTemplate, compile_template, split_path, unescape
from gateway.servicers.common import DROPPED_HEADERS

__all__ = [
    "ExtraRoute", "RestHandler", "RestOptions", "build_rest_handler", "error_body", "error_response", "rest_runner",
]

log = logging.getLogger("gateway.rest")

ExtraHandler = Callable[[web.BaseRequest, Mapping[str, str]], Awaitable[web.StreamResponse]]

JSON = "application/json"
NDJSON = "application/x-ndjson"
# Request headers that are no message header: those no message may carry (the servicers drop
# them too, for gRPC), and the body's encoding, already undone when the body reaches the message.
_NOT_BOUND = DROPPED_HEADERS | {"content-encoding"}
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GONE_CHECK_S = 0.5  # how often a REST stream waiting for its next message checks its client is there
_MESSAGE = options_pb2.ERROR_BODY_MESSAGE
_SUCCESS_FLAG = options_pb2.ERROR_BODY_SUCCESS_FLAG


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtraRoute:
    """A non-RPC route (grpc-gateway's ``HandlePath``): ``handler(request, path_params)``."""

    method: str
    template: str
    handler: ExtraHandler


@dataclass(frozen=True, slots=True, kw_only=True)
class RestOptions:
    cors_origins: tuple[str, ...] = ("*",)
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 30.0  # unary calls; streams only get a deadline from Grpc-Timeout
    extra_routes: tuple[ExtraRoute, ...] = ()
    allow_delete_body: bool = False
    unbound_methods: bool = False  # POST /<pkg.Service>/<Method> for methods without google.api.http


# ---------------------------------------------------------------- errors


def error_body(err: GatewayError, shape: int) -> bytes:
    """The JSON body of ``err``: its detail if it has one, else the method's ``ErrorBody`` shape.

    ``ERROR_BODY_MESSAGE`` is ``{"message": m}`` (also every UNAUTHENTICATED, as API.md wants),
    ``ERROR_BODY_SUCCESS_FLAG`` ``{"error": m, "success": false}``, unspecified grpc-gateway's
    ``{"code": <grpc code>, "message": m}``.
    """
    if err.detail is not None:
        return dumps(err.detail)
    if shape == _MESSAGE or err.code == grpc.StatusCode.UNAUTHENTICATED:  # API.md: every 401 is {"message": ...}
        return orjson.dumps({"message": err.message})
    if shape == _SUCCESS_FLAG:
        return orjson.dumps({"error": err.message, "success": False})
    return orjson.dumps({"code": err.code.value[0], "message": err.message})


def error_response(err: GatewayError, shape: int, headers: dict[str, str] | None = None) -> web.Response:
    """An error as an HTTP response: status from the status table, WWW-Authenticate, Retry-After."""
    out = {"Content-Type": JSON}
    if headers:
        out.update(headers)
    if err.http_status == 401:
        out["WWW-Authenticate"] = "Bearer"
    if err.retry_after is not None:
        out["Retry-After"] = str(max(0, math.ceil(err.retry_after)))
    return web.Response(status=err.http_status, body=error_body(err, shape), headers=out)


def _malformed(exc: Exception) -> InvalidArgument:
    """A body aiohttp could not read; its RequestPayloadError wraps the parser's HttpProcessingError."""
    cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__
    why = cause.message if isinstance(cause, HttpProcessingError) else "it cannot be read"
    return InvalidArgument(f"malformed request body: {why}")


def _too_large(limit: int) -> InvalidArgument:
    return InvalidArgument(f"request body too large (limit {limit} bytes)", http_status=413)


# ---------------------------------------------------------------- request parts


def message_headers(request: web.BaseRequest) -> dict[str, str]:
    """Request headers for a message: minus credentials, hop-by-hop and transport headers."""
    return _headers(request, "", want_message_headers=True)[1] or {}


def _headers(
    request: web.BaseRequest, query_string: str, *, want_message_headers: bool
) -> tuple[dict[str, str], dict[str, str] | None]:
    """One pass over the headers: (call metadata, headers for ``headers_field`` or None)."""
    md: dict[str, str] = {}
    out: dict[str, str] | None = {} if want_message_headers else None
    first: dict[str, str] = {}
    for key, value in request.headers.items():
        lower = key.lower()
        if not (key.isascii() and value.isascii()) and lower != "authorization" and not _is_utf8(key + value):
            # aiohttp keeps non-UTF-8 bytes as lone surrogates, which no proto string field takes
            raise InvalidArgument(f"header {key.encode(errors='replace').decode()!r}: not UTF-8")
        if lower in md:
            md[lower] = f"{md[lower]}, {value}"
        else:
            md[lower] = value
        if out is not None and lower not in _NOT_BOUND:
            if lower in first:
                out[first[lower]] += ", " + value
            else:
                first[lower] = key
                out[key] = value
    if out and "connection" in md:  # headers named in Connection are hop-by-hop too
        for name in md["connection"].split(","):
            out.pop(first.get(name.strip().lower(), ""), None)
    if "authorization" not in md and query_string:
        token = request.query.get("authorization")
        if token:
            md["authorization"] = f"Bearer {token}"
    return md, out


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _deadline(metadata: Mapping[str, str], default: float | None) -> float | None:
    text = metadata.get("grpc-timeout")
    if text is None:
        return None if default is None else time.monotonic() + default
    m = _GRPC_TIMEOUT.fullmatch(text.strip())
    if m is None:
        raise InvalidArgument(f"invalid Grpc-Timeout {text!r}")
    return time.monotonic() + int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)]


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if not request.body_exists:
        return b""
    content = request.content
    if content.is_eof():  # already all here (a small body): no read to wait for
        data = content.read_nowait()
        if len(data) > limit:
            raise _too_large(limit)
        return data
    data = await content.readany()
    size = len(data)
    if size > limit:
        raise _too_large(limit)
    if content.at_eof():
        return data
    chunks = [data]
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _ndjson_lines(request: web.BaseRequest, limit: int) -> AsyncIterator[bytes]:
    """Non-blank lines of the body, each at most ``limit`` bytes, read lazily."""
    buf = bytearray()
    content = request.content
    while True:
        try:
            chunk = await content.readany()
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # reaches the servicer: a GatewayError
            raise _malformed(exc) from None
        except ConnectionError:
            raise GatewayError("client went away", code=grpc.StatusCode.CANCELLED) from None
        if not chunk:
            break
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if end - start > limit:
                raise _too_large(limit)
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip():
                yield line
        del buf[:start]
        if len(buf) > limit:
            raise _too_large(limit)
    if bytes(buf).strip():
        yield bytes(buf)


# ---------------------------------------------------------------- the transcoder

Serve = Callable[[web.BaseRequest, Mapping[str, str], str, dict[str, str]], Awaitable[web.StreamResponse]]
ROUTE_CACHE_SIZE = 1024  # recent (method, raw path) -> RPC route and captures


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    template: PathTemplate
    serve: Serve  # (request, captured, query_string, cors headers)
    first: str | None = None  # template.first_literal, looked up once
    rpc: bool = True  # False for an ExtraRoute

    @classmethod
    def of(cls, method: str, template: PathTemplate, serve: Serve, rpc: bool = True) -> _Route:
        return cls(method, template, serve, template.first_literal, rpc)


class _Transcoder:
    def __init__(self, endpoints: list[Endpoint], options: RestOptions) -> None:
        self.options = options
        self.limit = options.max_body_bytes
        self.timeout = options.request_timeout_s
        self.cors_any = "*" in options.cors_origins
        self.cors_origins = frozenset(options.cors_origins)
        bindings = build_bindings(
            endpoints, allow_delete_body=options.allow_delete_body, unbound_methods=options.unbound_methods
        )
        routes = [_Route.of(b.http_method, b.template, self._server_for(b)) for b in bindings]
        for extra in options.extra_routes:
            routes.append(_Route.of(extra.method.upper(), compile_template(extra.template), self._extra(extra), False))
        self.routes = tuple(routes)
        by_method: dict[str, list[_Route]] = {}
        for r in routes:
            by_method.setdefault(r.method, []).append(r)
        self.by_method = {m: tuple(rs) for m, rs in by_method.items()}
        self.recent: dict[tuple[str, str], tuple[_Route, Mapping[str, str]]] = {}

    # ------------------------------------------------------------ dispatch

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if "Expect" in request.headers:
            expected = await _expect(request)
            if expected is not None:
                return expected
        cors = {"Access-Control-Allow-Origin": "*"} if self.cors_any else self._cors(request)
        raw = request.raw_path
        if not raw.startswith("/"):  # absolute-form request target
            raw = request.rel_url.raw_path_qs
        path, _, query_string = raw.partition("?")
        method = request.method
        hit = self.recent.get((method, path))
        if hit is not None:  # clients call the same few paths over and over: skip the matching
            return await hit[0].serve(request, hit[1], query_string, cors)
        try:
            components = split_path(path.partition("#")[0])
            first = components[0]
            if "%" in first:
                first = unescape(first)
            for route in self.by_method.get(method, ()):
                if route.first is not None and route.first != first:
                    continue
                params = route.template.match_components(components)
                if params is not None:
                    return await route.serve(request, self._remember(method, path, route, params), query_string, cors)
            if method == "HEAD":
                for route in self.by_method.get("GET", ()):
                    params = route.template.match_components(components)
                    if params is not None:
                        return await route.serve(request, params, query_string, cors)
            allowed = [r.method for r in self.routes if r.template.match_components(components) is not None]
        except MalformedPathError as exc:
            return error_response(InvalidArgument(str(exc)), 0, cors)
        allowed = list(dict.fromkeys(allowed))
        if not allowed:
            err = GatewayError("Not Found", http_status=404, code=grpc.StatusCode.NOT_FOUND)
            return error_response(err, 0, cors)
        if method == "OPTIONS":
            return self._preflight(request, allowed, cors)
        err = GatewayError("Method Not Allowed", http_status=405, code=grpc.StatusCode.UNIMPLEMENTED)
        return error_response(err, 0, {**cors, "Allow": ", ".join(allowed)})

    def _remember(self, method: str, path: str, route: _Route, params: dict[str, str]) -> Mapping[str, str]:
        """Cache an RPC route match (read-only captures: every later request shares them)."""
        if not route.rpc:
            return params
        if len(self.recent) >= ROUTE_CACHE_SIZE:
            self.recent.clear()
        frozen = MappingProxyType(params)
        self.recent[(method, path)] = (route, frozen)
        return frozen

    def _cors(self, request: web.BaseRequest) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is not None and origin in self.cors_origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {"Vary": "Origin"}

    def _preflight(self, request: web.BaseRequest, allowed: list[str], cors: dict[str, str]) -> web.Response:
        methods = ", ".join([*allowed, "OPTIONS"])
        requested = request.headers.get("Access-Control-Request-Headers")
        headers = {
            **cors,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": requested or "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Allow": methods,
        }
        return web.Response(status=204, headers=headers)

    def _extra(self, route: ExtraRoute) -> Serve:
        async def serve(
            request: web.BaseRequest, params: Mapping[str, str], _qs: str, cors: dict[str, str]
        ) -> web.StreamResponse:
            try:
                resp = await route.handler(request, params)
            except GatewayError as err:
                return error_response(err, 0, cors)
            except (ConnectionResetError, web.HTTPException):
                raise
            except Exception as exc:
                log.error("%s %s failed", route.method, route.template, exc_info=exc)
                return error_response(Internal("internal error"), 0, cors)
            if not resp.prepared:
                for key, value in cors.items():
                    resp.headers.setdefault(key, value)
            return resp

        return serve

    # ------------------------------------------------------------ RPCs

    def _server_for(self, b: Binding) -> Serve:
        endpoint = b.endpoint
        client_streaming, server_streaming = endpoint.client_streaming, endpoint.server_streaming
        timeout = None if client_streaming or server_streaming else self.timeout
        limit = self.limit
        shape = b.error_body
        has_body = bool(b.body)
        headers_field = bool(b.headers_field)
        has_query = b.query is not None
        encode = _encoder(b)
        content_type = "application/octet-stream" if b.raw_response else JSON

        async def serve(
            request: web.BaseRequest, params: Mapping[str, str], query_string: str, cors: dict[str, str]
        ) -> web.StreamResponse:
            ctx: CallContext | None = None
            try:
                metadata, headers = _headers(request, query_string, want_message_headers=headers_field)
                ctx = CallContext(
                    protocol="rest", metadata=metadata, peer_of=lambda: request.remote,
                    deadline=_deadline(metadata, timeout),
                )
                if client_streaming:
                    frames = (b.decode_frame(line) async for line in _ndjson_lines(request, limit))
                    reply = await endpoint.unary(frames, ctx)
                else:
                    data = await read_body(request, limit) if has_body else b""
                    ctx.request_bytes = len(data)  # for the Guard's byte-rate limit
                    msg = b.build(
                        data,
                        metadata.get("content-type", ""),
                        params,
                        headers,
                        request.query if has_query and query_string else None,
                    )
                    if server_streaming:
                        return await self._stream(request, b, msg, ctx, cors)
                    reply = await endpoint.unary(msg, ctx)
                body, ctype = encode(reply)
                cors["Content-Type"] = ctype or content_type
                if ctx.response_headers:
                    cors.update(ctx.response_headers)
                return web.Response(body=body, headers=cors)
            except GatewayError as err:
                resp = error_response(err, shape, {**cors, **ctx.response_headers} if ctx else cors)
                if err.http_status == 413:
                    resp.force_close()  # close rather than read the rest of the body
                return resp
            except (HttpProcessingError, web.RequestPayloadError) as exc:  # bad chunking, bad gzip, ...
                return error_response(_malformed(exc), shape, cors)
            except (ConnectionResetError, web.HTTPException):
                raise
            except Exception as exc:
                rid = ctx.request_id if ctx else 0
                log.error("transcoding %s failed (request id %d)", b.name, rid, exc_info=exc)
                return error_response(Internal(f"internal error (request id {rid})"), shape, cors)

        return serve

    async def _stream(
        self, request: web.BaseRequest, b: Binding, msg: Message, ctx: CallContext, cors: dict[str, str]
    ) -> web.StreamResponse:
        stream = b.endpoint.server_stream(msg, ctx)
        encode = _encoder(b)
        resp: web.StreamResponse | None = None
        try:
            try:
                first: Message | None = await _next_unless_gone(stream, request)
            except StopAsyncIteration:
                first = None
            headers = {**cors, "Content-Type": "application/octet-stream" if b.raw_response else NDJSON}
            headers.update(ctx.response_headers)
            resp = web.StreamResponse(headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            if first is not None:
                try:
                    item = first
                    while True:
                        data = encode(item)[0]
                        await resp.write(data if b.raw_response else b'{"result":' + data + b"}\n")
                        item = await _next_unless_gone(stream, request)
                except StopAsyncIteration:
                    pass
                except GatewayError as err:
                    status = {"code": err.code.value[0], "message": err.message}
                    await resp.write(orjson.dumps({"error": status}) + b"\n")
            await resp.write_eof()
            return resp
        except ConnectionError:  # the client went away mid-stream: stop the servicer quietly
            if resp is None:
                raise
            log.debug("%s: client went away mid-stream (request id %d)", b.name, ctx.request_id)
            return resp
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


async def _next_unless_gone(stream: AsyncIterator[Message], request: web.BaseRequest) -> Message:
    """The stream's next message, or ConnectionResetError once the client has gone away.

    aiohttp does not cancel the handler of a client that disconnected, and a stream with nothing
    to send never writes, so it would never notice: it would hold its broker fetches and the
    principal's stream slot for good. The transport is checked every _GONE_CHECK_S instead."""
    step = asyncio.ensure_future(anext(stream))
    try:
        while True:
            done, _ = await asyncio.wait((step,), timeout=_GONE_CHECK_S)
            if done:
                return step.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
    finally:
        if not step.done():
            step.cancel()  # the servicer stops, and the Guard releases the stream slot
            await asyncio.wait((step,))
        if not step.cancelled():
            step.exception()  # retrieved: never "Task exception was never retrieved"


def _encoder(b: Binding) -> Callable[[Message], tuple[bytes, str]]:
    """reply -> (body, content type or "" for the binding's default)."""
    field_name = b.response_body
    codec = b.response_codec
    if b.raw_response:

        def raw(reply: Message) -> tuple[bytes, str]:
            part: Any = getattr(reply, field_name) if field_name else reply
            return part.data, part.content_type

        return raw
    if field_name:
        return lambda reply: (orjson.dumps(codec.field_to_obj(reply, field_name)), JSON)
    return lambda reply: (codec.dumps(reply), JSON)


RestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def build_rest_handler(endpoints: list[Endpoint], options: RestOptions | None = None) -> RestHandler:
    """The request handler serving every bound RPC of ``endpoints`` (HttpRuleError if a rule is bad).

    It is served by aiohttp's low-level :class:`web.Server` (see :func:`rest_runner`): the
    transcoder does its own routing, so an ``Application`` and its router would only add a
    second dispatch per request."""
    return _Transcoder(endpoints, options or RestOptions()).handle


def rest_runner(handler: RestHandler, *, loop: asyncio.AbstractEventLoop | None = None,
                shutdown_timeout: float = 60.0, **handler_args: Any) -> web.ServerRunner:
    """A runner for ``handler`` (then ``await runner.setup()`` and start a ``web.TCPSite``).

    ``handler_args`` go to aiohttp's ``RequestHandler`` (``keepalive_timeout``, ...); aiohttp's
    own access log stays off, the gateway logs every call itself."""
    server = web.Server(handler, loop=loop, access_log=None, **handler_args)
    return web.ServerRunner(server, shutdown_timeout=shutdown_timeout)


async def _expect(request: web.BaseRequest) -> web.StreamResponse | None:
    """``Expect: 100-continue`` as aiohttp does; any other expectation 417 in JSON.

    aiohttp's own handler echoes the header into a text/plain 417, and answers 500 when the value
    holds non-UTF-8 bytes."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body has not started
        return None
    err = GatewayError("Expectation Failed: only 100-continue is supported", http_status=417,
                       code=grpc.StatusCode.FAILED_PRECONDITION)
    return error_response(err, 0)
