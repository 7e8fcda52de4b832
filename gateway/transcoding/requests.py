"""Reading requests: headers into call metadata, Grpc-Timeout, bodies within their limit, NDJSON frames."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping

import grpc
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.core.budget import Budget
from gateway.core.deadlines import timeout
from gateway.core.errors import GatewayError, InvalidArgument
from gateway.core.headers import DROPPED, canonical
from gateway.transcoding.responses import error_response

# Request headers never bound to a headers field (memgw.v1.transcoding.headers_field): credentials and
# transport headers (gateway.core.headers.DROPPED, the one list; it drops them from gRPC maps too), and
# the body's encoding, undone before the body reaches the message.
_NOT_BOUND = DROPPED | {"content-encoding"}
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def malformed(exc: Exception) -> InvalidArgument:
    """A body aiohttp could not read; its RequestPayloadError wraps the parser's HttpProcessingError."""
    cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__
    why = cause.message if isinstance(cause, HttpProcessingError) else "it cannot be read"
    return InvalidArgument(f"malformed request body: {why}")


def too_large(limit: int) -> InvalidArgument:
    return InvalidArgument(f"request body too large (limit {limit} bytes)", http_status=413)


def request_headers(
    request: web.BaseRequest, query_string: str, *, want_message_headers: bool
) -> tuple[dict[str, str], dict[str, str] | None]:
    """One pass over the headers: (call metadata, headers for ``headers_field`` or None)."""
    md: dict[str, str] = {}
    out: dict[str, str] | None = {} if want_message_headers else None
    first: dict[str, str] = {}
    for key, value in request.headers.items():
        lower = key.lower()
        if not (key.isascii() and value.isascii()) and not _is_utf8(key + value):
            # aiohttp keeps non-UTF-8 bytes as lone surrogates, which no proto string field takes
            if lower == "authorization":  # the token check refuses it (401), nothing binds it
                md[lower] = value
                continue
            raise InvalidArgument(f"header {key.encode(errors='replace').decode()!r}: not UTF-8")
        if lower in md:
            md[lower] = f"{md[lower]}, {value}"
        else:
            md[lower] = value
        if out is not None and lower not in _NOT_BOUND:
            if lower in first:
                out[first[lower]] += ", " + value
            else:
                first[lower] = key = canonical(key)  # stored as the upstream stores it (X-Example-Id)
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


def call_deadline(metadata: Mapping[str, str], default: float | None) -> float | None:
    text = metadata.get("grpc-timeout")
    if text is None:
        return None if default is None else time.monotonic() + default
    m = _GRPC_TIMEOUT.fullmatch(text.strip())
    if m is None:
        raise InvalidArgument(f"invalid Grpc-Timeout {text!r}")
    return time.monotonic() + int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)]


def slow_body(seconds: float) -> GatewayError:
    return GatewayError(f"request body not received within {seconds:g} s: send the whole body at once",
                        http_status=408, code=grpc.StatusCode.DEADLINE_EXCEEDED)


async def read_body(request: web.BaseRequest, limit: int, budget: Budget, timeout_s: float) -> bytes:
    """The whole body: refused (413) as soon as it passes ``limit`` bytes, (408) if it is not all
    there within ``timeout_s``, (503) if ``budget`` cannot hold it. The caller gives back
    ``len(result)`` to ``budget`` once the call is over."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    if not request.body_exists:
        return b""
    content = request.content
    if content.is_eof():  # already all here (a small body): no read to wait for
        data = content.read_nowait()
        if len(data) > limit:
            raise too_large(limit)
        budget.take(len(data))
        return data
    taken = length or 0  # a declared length is reserved up front; a chunked body chunk by chunk
    budget.take(taken)
    chunks: list[bytes] = []
    size = 0
    try:
        async with timeout(timeout_s):
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                if size > taken:
                    budget.take(size - taken)
                    taken = size
                chunks.append(chunk)
    except TimeoutError:
        budget.give(taken)
        raise slow_body(timeout_s) from None
    except BaseException:
        budget.give(taken)
        raise
    if size != taken:
        budget.give(taken - size)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def ndjson_lines(request: web.BaseRequest, limit: int, idle_s: float) -> AsyncIterator[bytes]:
    """Non-blank lines of the body, each at most ``limit`` bytes, read lazily; a body that sends
    nothing for ``idle_s`` is refused (408)."""
    buf = bytearray()
    content = request.content
    while True:
        try:
            async with timeout(idle_s):
                chunk = await content.readany()
        except TimeoutError:
            raise GatewayError(f"no request data for {idle_s:g} s: send stream frames without long pauses",
                               http_status=408, code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # reaches the servicer: a GatewayError
            raise malformed(exc) from None
        except ConnectionError:
            raise GatewayError("client went away", code=grpc.StatusCode.CANCELLED) from None
        if not chunk:
            break
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if end - start > limit:
                raise too_large(limit)
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip():
                yield line
        del buf[:start]
        if len(buf) > limit:
            raise too_large(limit)
    if bytes(buf).strip():
        yield bytes(buf)


def expect(request: web.BaseRequest) -> web.StreamResponse | None:
    """``Expect``: None for ``100-continue`` (answered by :func:`send_continue` once the request
    is admitted), otherwise a 417 in JSON.

    aiohttp's own handler echoes the header into a text/plain 417, and answers 500 when the value
    holds non-UTF-8 bytes."""
    if request.version != HttpVersion11 or request.headers.get("Expect", "").lower() == "100-continue":
        return None
    err = GatewayError("Expectation Failed: only 100-continue is supported", http_status=417,
                       code=grpc.StatusCode.FAILED_PRECONDITION)
    return error_response(err, 0)


async def send_continue(request: web.BaseRequest) -> None:
    """``100 Continue`` if the client waits for it: only once the route is known and the call
    admitted, so a client that would be refused is told so before it sends its body."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body has not started
