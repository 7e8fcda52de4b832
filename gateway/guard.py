"""Admission of every call, gRPC or REST: the token, then the per-principal limits."""

from __future__ import annotations

import logging
from collections import Counter

from gateway.calls import CallContext, Endpoint
from gateway.errors import ResourceExhausted, Unauthenticated
from gateway.tokens import ACCESS, TokenService, bearer

log = logging.getLogger("gateway.auth")


class Guard:
    def __init__(self, tokens: TokenService, *, max_streams_per_principal: int = 16) -> None:
        self._tokens = tokens
        self._max_streams = max_streams_per_principal
        self._streams: Counter[str] = Counter()

    async def admit(self, endpoint: Endpoint, ctx: CallContext) -> None:
        if endpoint.public:
            return
        try:
            ctx.principal, _ = self._tokens.verify(bearer(ctx.metadata.get("authorization")), ACCESS)
        except Unauthenticated as exc:
            log.info("refused %s %s from %s: %s", ctx.protocol, endpoint.full_name, ctx.peer or "-", exc.reason)
            raise
        if endpoint.server_streaming or endpoint.client_streaming:
            session = ctx.principal.session
            if self._streams[session] >= self._max_streams:
                ctx.principal = None  # nothing to release
                raise ResourceExhausted(f"at most {self._max_streams} concurrent streams per user")
            self._streams[session] += 1

    def release(self, endpoint: Endpoint, ctx: CallContext) -> None:
        if ctx.principal is not None and (endpoint.server_streaming or endpoint.client_streaming):
            session = ctx.principal.session
            self._streams[session] -= 1
            if self._streams[session] <= 0:
                del self._streams[session]
