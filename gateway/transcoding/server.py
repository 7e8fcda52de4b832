"""The REST server: aiohttp's low-level server handing every request to the :class:`Mux`.

Public surface of the transcoder: ``build_rest_handler`` and ``rest_runner``, with
``RestOptions`` and ``ExtraRoute`` for what is served beside the RPCs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.rpc.call import Endpoint
from gateway.transcoding.mux import Mux, RestOptions
from gateway.transcoding.routes import ExtraRoute

__all__ = ["ExtraRoute", "RestHandler", "RestOptions", "build_rest_handler", "rest_runner"]

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
