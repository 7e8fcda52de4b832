"""The Broker over memphis-py, composed of its parts.

``MemphisBroker`` is what the servicers get (``gateway.broker.seam.Broker``):

- ``sessions``: one memphis-py connection per user, what happens when it drops;
- ``produce``: routes into stations and pipelined publishing (``publisher``);
- ``consume``: consumer groups, fetches with a real wait, acknowledgements (``ackid``);
- ``sdk``: memphis-py's calls, errors and bugs, in one place; ``natsutil``: NATS helpers.

Nothing here knows of tokens, protocols or HTTP: callers pass the user's credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.broker.ackid import AckIds
from gateway.broker.consume import Consuming
from gateway.broker.events import event_stream
from gateway.broker.natsutil import parse_servers, ping, probe
from gateway.broker.produce import Producing
from gateway.broker.seam import ConsumerSpec, InMessage
from gateway.broker.sessions import Session, SessionPool
from gateway.core.budget import Budget
from gateway.core.errors import Unavailable
from gateway.core.identity import Credentials


class MemphisBroker:
    def __init__(
        self, url: str, *, timeout_s: float, idle_s: float, ack_key: bytes, service_nc: Any = None,
        tls: tuple[str, str, str] | None = None, max_inflight_produce_bytes: int,
    ) -> None:
        self._pool = SessionPool(url, timeout_s=timeout_s, idle_s=idle_s, tls=tls)
        self._servers = parse_servers(url)
        self._timeout = timeout_s
        self._service_nc = service_nc
        unacknowledged = Budget(max_inflight_produce_bytes, "messages awaiting the broker's acknowledgement")
        self._producing = Producing(self._pool, timeout_s, unacknowledged)
        self._consuming = Consuming(self._pool, timeout_s, AckIds(ack_key))
        self.produce = self._producing.produce
        self.fetch = self._consuming.fetch
        self.ack = self._consuming.ack

    async def open_session(self, creds: Credentials) -> Credentials:
        return await self._pool.open(creds)

    def subscribe(self, creds: Credentials, spec: ConsumerSpec, batch_size: int) -> AsyncIterator[list[InMessage]]:
        return self._consuming.subscribe(creds, spec, batch_size)

    def events(
        self, creds: Credentials, spec: ConsumerSpec, resume: dict[int, int] | None
    ) -> AsyncIterator[tuple[dict[int, int], InMessage | None]]:
        return event_stream(self._pool, self._consuming, creds, spec, resume)

    def sessions(self) -> list[Session]:
        """The open user sessions (for tests and diagnostics)."""
        return self._pool.all()

    def begin_drain(self) -> None:
        """Stopping: streams (subscribe) end after their current fetch; other calls go on."""
        self._consuming.draining = True

    async def close(self, timeout_s: float = 2.0) -> None:
        await self._pool.close(timeout_s)

    async def health(self) -> str | None:
        if self._service_nc is not None:
            if not self._service_nc.is_connected:
                return "broker unavailable: the connection to the broker is lost and being re-established"
            if not await ping(self._service_nc, min(self._timeout, 2.0)):
                return f"broker unavailable: no answer to a ping within {min(self._timeout, 2.0):g} s"
            return None
        reasons = []
        for host, port in self._servers:
            why = await probe(host, port, min(self._timeout, 2.0))
            if why is None:
                return None
            reasons.append(f"{host}:{port} ({why})")
        return f"broker unavailable: {', '.join(reasons)}"

    async def storage_bytes(self, creds: Credentials) -> int:
        async with self._pool.using(creds) as session:
            try:
                info = await session.js.account_info()
            except Exception as exc:
                raise Unavailable(f"broker unavailable: {type(exc).__name__}") from None
        return int(info.storage)
