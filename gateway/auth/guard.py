"""Admission of every call, gRPC or REST: the token or API key, the caller's rights, then the limits.

The rights are checked here, once for both protocols, from what each RPC declares in the protos
(``(memgw.v1.access)``: its action and the request field naming its station); see
``gateway.auth.access``. A call touching several stations checks each with ``ctx.authorize``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from gateway.auth.directory import Directory, is_key_header
from gateway.auth.ratelimit import TokenBuckets
from gateway.auth.tokens import ACCESS, TokenService
from gateway.core.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from gateway.rpc.call import CallContext, Endpoint

log = logging.getLogger("gateway.auth")


class Guard:
    def __init__(
        self,
        tokens: TokenService,
        directory: Directory | None = None,
        *,
        max_streams_per_principal: int = 16,
        requests_per_s: float = 0,
        bytes_per_s: float = 0,
        also_public: frozenset[str] = frozenset(),
    ) -> None:
        self._tokens = tokens
        self._directory = directory or Directory(tokens, "root", managed=False)
        self._also_public = also_public  # endpoint full names public by configuration (DEV_ENV)
        self._max_streams = max_streams_per_principal
        self._streams: Counter[str] = Counter()
        self._requests = TokenBuckets(requests_per_s, requests_per_s) if requests_per_s > 0 else None
        self._bytes = TokenBuckets(bytes_per_s, bytes_per_s) if bytes_per_s > 0 else None

    def admit(self, endpoint: Endpoint, ctx: CallContext) -> None:
        """Who calls (token or API key), within their limits; the station is checked by ``authorize``."""
        if endpoint.public or endpoint.full_name in self._also_public:
            return
        header = ctx.metadata.get("authorization")
        try:
            if is_key_header(header):
                assert header is not None
                principal, access = self._directory.verify_key(header)
            else:
                principal, _ = self._tokens.verify_header(header, ACCESS)
                access = self._directory.access_of(principal)
        except Unauthenticated as exc:
            log.info("refused %s %s from %s: %s", ctx.protocol, endpoint.full_name, ctx.peer or "-", exc.reason)
            raise
        ctx.authorizer = access.check
        ctx.principal = principal
        session = principal.identity
        if self._requests is not None or self._bytes is not None:
            self._limit_rate(session, ctx)
        if endpoint.server_streaming or endpoint.client_streaming:
            if self._streams[session] >= self._max_streams:
                ctx.principal = None  # nothing to release
                raise ResourceExhausted(f"at most {self._max_streams} concurrent streams per user")
            self._streams[session] += 1

    def authorize(self, endpoint: Endpoint, ctx: CallContext, request: Any) -> None:
        """May the admitted caller do ``endpoint.action`` to the request's station? PermissionDenied if not.

        A client stream names its stations frame by frame: the servicer checks each (``ctx.authorize``)."""
        if not endpoint.action or ctx.authorizer is None or (endpoint.client_streaming and not endpoint.station_field):
            return
        station = getattr(request, endpoint.station_field, "") if endpoint.station_field else ""
        try:
            ctx.authorizer(endpoint.action, station.lower())
        except PermissionDenied as exc:
            log.info("denied %s %s from %s: %s", ctx.protocol, endpoint.full_name, ctx.peer or "-", exc.message)
            raise

    def _limit_rate(self, session: str, ctx: CallContext) -> None:
        wait = self._requests.take(session) if self._requests is not None else 0.0
        if not wait and self._bytes is not None and ctx.request_bytes:
            wait = self._bytes.take(session, ctx.request_bytes)
        if wait:
            ctx.principal = None  # nothing to release
            raise ResourceExhausted(f"rate limit exceeded; retry in {wait:.2f} s", retry_after=wait)

    @property
    def meters_bytes(self) -> bool:
        return self._bytes is not None

    def charge(self, ctx: CallContext, nbytes: int) -> None:
        """Charge one frame of a client stream to the caller's bytes/s budget."""
        if self._bytes is None or ctx.principal is None:
            return
        wait = self._bytes.take(ctx.principal.identity, nbytes)
        if wait:
            raise ResourceExhausted(f"rate limit exceeded; retry in {wait:.2f} s", retry_after=wait)

    def release(self, endpoint: Endpoint, ctx: CallContext) -> None:
        if ctx.principal is not None and (endpoint.server_streaming or endpoint.client_streaming):
            session = ctx.principal.identity
            self._streams[session] -= 1
            if self._streams[session] <= 0:
                del self._streams[session]
