"""The gateway's own broker: the embedded nats-server it runs, and its service connections.

- :func:`embedded_broker`: the nats-server these settings describe (refused with the development
  password on a reachable address, or token mode without a token);
- :func:`connect_service`: the gateway's own connections (control plane, control requests, the
  workers' metrics), which wait for a broker that starts later but fail at once on a TLS refusal;
- :func:`users_applier`: the users directory applied to the embedded broker's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient

from gateway.auth.directory import UserRecord
from gateway.broker.natsutil import RECONNECT_WAIT_S, parse_servers, tls_context, tls_failure
from gateway.core.keys import derive_key
from gateway.embedded.permissions import user_permissions
from gateway.embedded.server import AccountLimits, EmbeddedBroker
from gateway.settings import Settings, SettingsError


def users_applier(embedded: EmbeddedBroker) -> Callable[[list[UserRecord]], Awaitable[None]]:
    """Applies the directory's users to the embedded nats-server (subject permissions from their patterns)."""

    async def apply(users: list[UserRecord]) -> None:
        await embedded.reload_users({
            u.username: (u.password_hash, None if u.type == "management" else user_permissions(u.produce, u.consume))
            for u in users
        })

    return apply



def embedded_broker(s: Settings) -> EmbeddedBroker:
    """The embedded broker these settings describe; SettingsError if it must not start (its
    development password on a reachable address; token mode without a token)."""
    if (why := s.unsafe_embedded_password()) is not None:
        raise SettingsError(why)
    if s.auth_mode == "token" and not s.connection_token:
        raise SettingsError("connection-token mode (USER_PASS_BASED_AUTH false) with the embedded broker "
                            "needs a token: set CONNECTION_TOKEN or MEMPHIS_GATEWAY_CONNECTION_TOKEN")
    limits = AccountLimits(
        max_streams=s.broker_max_streams or -1,
        max_consumers=s.broker_max_consumers or -1,
        max_memory_bytes=s.broker_max_memory_mb * 2**20 or -1,
        max_store_bytes=s.broker_max_store_mb * 2**20 or -1,
    )
    return EmbeddedBroker(data_dir=s.data_dir, port=s.broker_port, root_user=s.root_user,
                          root_password=s.root_password, limits=limits,
                          connection_token=s.connection_token if s.auth_mode == "token" else "",
                          control_password=control_password(s))



def control_password(s: Settings) -> str:
    """The password of the control plane's broker user (``CONTROL_USER``): derived from the JWT
    secret, which every replica and worker shares, so it needs no setting of its own."""
    return derive_key(s.jwt_secret, "control-plane-user").hex() if s.jwt_secret else ""



class BrokerRefused(RuntimeError):
    """The broker cannot be reached with this configuration (no retry helps); the message says what to set."""



async def connect_service(s: Settings, broker_url: str, credentials: dict[str, Any] | None = None,
                          name: str = "memphis-gateway::control-plane") -> Any:
    """A nats-py connection of the gateway's own (control plane, control requests, worker metrics), as
    root (or ``credentials``), reconnecting forever; BrokerRefused when a TLS handshake fails."""
    tls = s.broker_tls
    scheme = "tls" if tls else "nats"
    servers = [f"{scheme}://{host}:{port}" for host, port in parse_servers(broker_url)]
    credentials = credentials or (
        {"token": s.connection_token} if s.auth_mode == "token" and s.connection_token
        else {"user": f"{s.root_user}$1", "password": s.root_password}
    )
    cp_log = logging.getLogger("gateway.broker")
    down_since: list[float] = []
    # the first connect retries forever (a broker that starts later is waited for), except a failed
    # TLS handshake: no retry fixes a missing or untrusted certificate, so start-up fails and says why
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if refused.done() and not refused.cancelled():
            return  # start-up is failing with the reason already
        if not refused.done() and (why := tls_failure(exc, broker_url, tls)) is not None:
            refused.set_result(why)
            return
        if not down_since:  # one line per outage, not one per reconnect attempt
            cp_log.warning("control-plane connection: %s", exc or type(exc).__name__)

    async def on_disconnected() -> None:
        if not down_since and not nc.is_closed:
            down_since.append(time.monotonic())
            cp_log.warning("control-plane connection lost; reconnecting")

    async def on_reconnected() -> None:
        took = time.monotonic() - down_since.pop() if down_since else 0.0
        cp_log.info("control-plane connection re-established after %.1f s", took)

    options: dict[str, Any] = {
        **credentials,
        "tls": tls_context(tls),
        "name": name,
        "connect_timeout": s.broker_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    nc = NatsClient()
    connecting = asyncio.ensure_future(nc.connect(servers, **options))
    await asyncio.wait((connecting, refused), return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise BrokerRefused(refused.result())
    refused.cancel()
    connecting.result()
    return nc
