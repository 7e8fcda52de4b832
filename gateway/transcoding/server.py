"""The REST server: aiohttp's low-level server handing every request to the :class:`Mux`.

Public surface of the transcoder: ``build_rest_handler`` and ``rest_runner``, with
``RestOptions`` and ``ExtraRoute`` for what is served beside the RPCs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.rpc.call import Endpoint
from gateway.transcoding.mux import Mux, RestOptions
from gateway.transcoding.routes import ExtraRoute

__all__ = ["ExtraRoute", "RestHandler", "RestOptions", "abort_stalled_sends", "build_rest_handler", "rest_runner"]

log = logging.getLogger("gateway.rest")
RestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def build_rest_handler(endpoints: list[Endpoint], options: RestOptions | None = None) -> RestHandler:
    """The request handler serving every bound RPC of ``endpoints`` (HttpRuleError if a rule is bad).

    It is served by aiohttp's low-level :class:`web.Server` (see :func:`rest_runner`): the
    transcoder does its own routing, so an ``Application`` and its router would only add a
    second dispatch per request."""
    return Mux(endpoints, options or RestOptions()).handle


def rest_runner(handler: RestHandler, *, loop: asyncio.AbstractEventLoop | None = None,
                shutdown_timeout: float = 60.0, **handler_args: Any) -> web.ServerRunner:
    """A runner for ``handler`` (then ``await runner.setup()`` and start a ``web.TCPSite``).

    ``handler_args`` go to aiohttp's ``RequestHandler`` (``keepalive_timeout``, ...); aiohttp's
    own access log stays off, the gateway logs every call itself."""
    server = web.Server(handler, loop=loop, access_log=None, **handler_args)
    return web.ServerRunner(server, shutdown_timeout=shutdown_timeout)


SEND_CHECK_INTERVAL_S = 1.0


async def abort_stalled_sends(runner: web.ServerRunner, timeout_s: float) -> None:
    """Abort HTTP connections whose write buffer has not shrunk for ``http_send_timeout_s``.

    asyncio buffers whatever a response writes beyond what the socket takes; for a
    client that stopped reading, that buffer (a whole consume batch) would stay forever,
    and with it the handler and its connection."""
    seen: dict[Any, tuple[int, float]] = {}  # handler -> (buffered bytes, last progress)
    while True:
        await asyncio.sleep(SEND_CHECK_INTERVAL_S)
        server = runner.server
        if server is None:
            return
        now = time.monotonic()
        alive = set()
        for handler in server.connections:
            transport = handler.transport
            size = transport.get_write_buffer_size() if transport is not None else 0
            if not size:
                continue
            alive.add(handler)
            last = seen.get(handler)
            if last is None or size < last[0]:
                seen[handler] = (size, now)
                continue
            seen[handler] = (size, last[1])
            if now - last[1] >= timeout_s:
                peer = transport.get_extra_info("peername") if transport is not None else None
                log.info("HTTP client %s stopped reading (%d bytes unsent for %.0f s): connection aborted",
                         peer, size, now - last[1])
                if transport is not None:
                    transport.abort()
                alive.discard(handler)
        for handler in set(seen) - alive:
            del seen[handler]
