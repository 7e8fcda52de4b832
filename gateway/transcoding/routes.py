"""Non-RPC routes served beside the transcoded RPCs (grpc-gateway's ``HandlePath``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

ExtraHandler = Callable[[web.BaseRequest, Mapping[str, str]], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtraRoute:
    """A non-RPC route (grpc-gateway's ``HandlePath``): ``handler(request, path_params)``."""

    method: str
    template: str
    handler: ExtraHandler
