"""Forwarding one HTTP request to its RPC (grpc-gateway's ``handler.go``), and the answer back.

Per request: the message is built from the body (``*``, a field, or raw bytes for a
``google.api.HttpBody``), then the path captures, then the query string; the request
headers fill ``transcoding.headers_field``; a :class:`CallContext` carries the lower-cased
headers as metadata. Unary and client-streaming (NDJSON body) methods answer one JSON
document; server-streaming methods answer NDJSON lines ``{"result": ...}``, a failure after
the first line being a last ``{"error": ...}`` line. Nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf.message import Message

from gateway.core.budget import Budget
from gateway.core.errors import GatewayError, Internal
from gateway.rpc.call import CallContext
from gateway.transcoding.bindings import Binding
from gateway.transcoding.requests import (
    call_deadline,
    malformed,
    ndjson_lines,
    read_body,
    request_headers,
    send_continue,
)
from gateway.transcoding.responses import JSON, NDJSON, encoder, error_response

log = logging.getLogger("gateway.rest")
_GONE_CHECK_S = 0.5  # how often a REST stream waiting for its next message checks its client is there
SSE_HEARTBEAT_S = 15.0  # a comment line after this long without an event
SSE = "text/event-stream"
Serve = Callable[[web.BaseRequest, Mapping[str, str], str, dict[str, str]], Awaitable[web.StreamResponse]]


def forwarder(b: Binding, *, limit: int, timeout: float, body_timeout: float, budget: Budget) -> Serve:
    """``serve(request, path captures, query string, CORS headers)`` for binding ``b``.

    ``timeout`` is the deadline of unary calls (streams get one only from Grpc-Timeout);
    ``body_timeout`` bounds the reading of a body, ``budget`` the body bytes held by all requests.
    The call is admitted (token, limits) before any of its body is read."""
    endpoint = b.endpoint
    client_streaming, server_streaming = endpoint.client_streaming, endpoint.server_streaming
    deadline_s = None if client_streaming or server_streaming else timeout
    shape = b.error_body
    has_body = bool(b.body)
    headers_field = bool(b.headers_field)
    has_query = b.query is not None
    encode = encoder(b)
    content_type = "application/octet-stream" if b.raw_response else JSON

    async def serve(
        request: web.BaseRequest, params: Mapping[str, str], query_string: str, cors: dict[str, str]
    ) -> web.StreamResponse:
        ctx: CallContext | None = None
        held = 0
        try:
            metadata, headers = request_headers(request, query_string, want_message_headers=headers_field)
            ctx = CallContext(
                protocol="rest", metadata=metadata, peer_of=lambda: request.remote,
                deadline=call_deadline(metadata, deadline_s),
            )
            expects = "Expect" in request.headers
            if client_streaming:
                endpoint.admit(ctx)
                if expects:
                    await send_continue(request)
                frames = (b.decode_frame(line) async for line in ndjson_lines(request, limit, body_timeout))
                reply = await endpoint.unary(frames, ctx)
            else:
                declared = request.content_length
                ctx.request_bytes = declared or 0  # for the Guard's byte-rate limit
                started = endpoint.admit(ctx)
                try:
                    if expects and has_body:
                        await send_continue(request)
                    data = await read_body(request, limit, budget, body_timeout) if has_body else b""
                    held = len(data)
                    if declared is None and data:
                        ctx.request_bytes = held
                        endpoint.charge(ctx, held)
                    msg = b.build(
                        data,
                        metadata.get("content-type", ""),
                        params,
                        headers,
                        request.query if has_query and query_string else None,
                    )
                except BaseException as exc:
                    endpoint.abandon(ctx, exc, started)
                    raise
                if server_streaming:
                    return await stream_response(request, b, msg, ctx, cors)
                reply = await endpoint.unary(msg, ctx)
            body, ctype = encode(reply)
            cors["Content-Type"] = ctype or content_type
            if ctx.response_headers:
                cors.update(ctx.response_headers)
            return web.Response(body=body, headers=cors)
        except GatewayError as err:
            resp = error_response(err, shape, {**cors, **ctx.response_headers} if ctx else cors)
            if not request.content.is_eof():
                resp.force_close()  # close rather than read (or wait for) the rest of the body
            return resp
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # bad chunking, bad gzip, ...
            return error_response(malformed(exc), shape, cors)
        except (ConnectionResetError, web.HTTPException):
            raise
        except Exception as exc:
            rid = ctx.request_id if ctx else 0
            log.error("transcoding %s failed (request id %d)", b.name, rid, exc_info=exc)
            return error_response(Internal(f"internal error (request id {rid})"), shape, cors)
        finally:
            if held:
                budget.give(held)

    return serve


async def stream_response(
    request: web.BaseRequest, b: Binding, msg: Message, ctx: CallContext, cors: dict[str, str]
) -> web.StreamResponse:
    if b.sse:
        return await sse_response(request, b, msg, ctx, cors)
    stream = b.endpoint.server_stream(msg, ctx)
    encode = encoder(b)
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


async def sse_response(
    request: web.BaseRequest, b: Binding, msg: Message, ctx: CallContext, cors: dict[str, str]
) -> web.StreamResponse:
    """A server stream as server-sent events (``StreamFormat SSE``, docs/transcoding.md).

    Each message is one event: ``id:`` its event_id_field, ``data:`` its response_body field as
    JSON (the id alone when that field is unset: EventSource then only records the id). A comment
    line every SSE_HEARTBEAT_S of silence keeps proxies from closing the connection. Errors before
    the first event answer with a status; after it, an ``event: error`` with the JSON status."""
    stream = b.endpoint.server_stream(msg, ctx)
    data_field, id_field = b.response_body, b.event_id_field
    resp: web.StreamResponse | None = None

    async def heartbeat() -> None:
        assert resp is not None
        await resp.write(b": keep-alive\n\n")

    def event(item: Message) -> bytes:
        event_id = str(getattr(item, id_field)).replace("\n", "").replace("\r", "")
        if not item.HasField(data_field):
            return f"id: {event_id}\n\n".encode()
        data = encoder(b)(item)[0]  # one line: orjson never writes a raw newline
        return b"id: " + event_id.encode() + b"\ndata: " + data + b"\n\n"

    try:
        try:
            first: Message | None = await _next_unless_gone(stream, request)
        except StopAsyncIteration:
            first = None
        headers = {**cors, "Content-Type": SSE, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        headers.update(ctx.response_headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        await resp.write(b"retry: 1000\n\n")
        if first is not None:
            try:
                item = first
                while True:
                    await resp.write(event(item))
                    item = await _next_unless_gone(stream, request, heartbeat)
            except StopAsyncIteration:
                pass
            except GatewayError as err:
                status = {"code": err.code.value[0], "message": err.message}
                await resp.write(b"event: error\ndata: " + orjson.dumps(status) + b"\n\n")
        await resp.write_eof()
        return resp
    except ConnectionError:
        if resp is None:
            raise
        log.debug("%s: client went away mid-stream (request id %d)", b.name, ctx.request_id)
        return resp
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _next_unless_gone(
    stream: AsyncIterator[Message], request: web.BaseRequest, heartbeat: Callable[[], Awaitable[None]] | None = None
) -> Message:
    """The stream's next message, or ConnectionResetError once the client has gone away.

    aiohttp does not cancel the handler of a client that disconnected, and a stream with nothing
    to send never writes, so it would never notice: it would hold its broker fetches and the
    principal's stream slot for good. The transport is checked every _GONE_CHECK_S instead."""
    step = asyncio.ensure_future(anext(stream))
    quiet_since = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait((step,), timeout=_GONE_CHECK_S)
            if done:
                return step.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            if heartbeat is not None and time.monotonic() - quiet_since >= SSE_HEARTBEAT_S:
                await heartbeat()
                quiet_since = time.monotonic()
    finally:
        if not step.done():
            step.cancel()  # the servicer stops, and the Guard releases the stream slot
            await asyncio.wait((step,))
        if not step.cancelled():
            step.exception()  # retrieved: never "Task exception was never retrieved"
