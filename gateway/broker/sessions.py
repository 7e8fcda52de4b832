"""A user's broker connection (memphis-py) and the pool that keeps them.

One ``Session`` per set of credentials: a memphis-py connection with its nats-py
client, the user's producers (one route per station) and consumer groups, and the
publishes in flight. The pool opens sessions on first use, replaces those nats-py
closed for good, and closes idle ones.

Broker faults (nats-py reconnects by itself, forever; docs/memphis-py.md, "Reconnect"):
- while a session's connection is down, calls fail at once with UNAVAILABLE (503)
  instead of buffering into nats-py's reconnect buffer;
- calls in flight when the connection drops fail at once too: the session fails
  the futures it tracks, and waits race its ``lost`` future;
- memphis-py's connect (its ping connection retries forever with
  max_reconnect=-1) is probed first and bounded by the broker timeout;
- ``host1:port1,host2:port2``: a new session tries each server in turn; nats-py
  then also learns the cluster's other servers from the one it reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from memphis import Memphis
from memphis.exceptions import MemphisError

from gateway.broker.natsutil import (
    DOWN,
    DOWN_SHORT,
    RECONNECT_WAIT_S,
    RETRY_AFTER_S,
    check_token,
    parse_servers,
    probe,
    tls_failure,
    tls_files,
)
from gateway.broker.publisher import Publisher
from gateway.broker.routes import ConnectionLost, Group, Route
from gateway.broker.sdk import abandon, parse_descriptor, tls_safe
from gateway.core.deadlines import timeout
from gateway.core.errors import Unauthenticated, Unavailable
from gateway.core.identity import Credentials
from gateway.core.names import internal_name

log = logging.getLogger("gateway.broker")
K = TypeVar("K")
V = TypeVar("V")

__all__ = [
    "BROKER_UNAVAILABLE", "DOWN", "DOWN_SHORT", "RETRY_AFTER_S", "ConnectionLost", "Group", "Route", "Session",
    "SessionPool",
]

SDK_UPDATES = "$memphis_sdk_clients_updates"  # where the control plane announces a removed station
BROKER_UNAVAILABLE = "broker unavailable; retry shortly"  # what a caller hears (the log has the addresses)


@dataclass(slots=True, kw_only=True)
class Session:
    memphis: Memphis
    last_used: float
    creds: Credentials = field(repr=False)  # the credentials the connection was opened with
    proven: set[Credentials] = field(default_factory=set, repr=False)  # others the broker accepted for it
    routes: dict[str, Route] = field(default_factory=dict)
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    locks: dict[Any, asyncio.Lock] = field(default_factory=dict)
    in_use: int = 0
    label: str = ""
    publisher: Publisher | None = None
    _lost: asyncio.Future[None] | None = None
    _down_since: float | None = None
    nc: Any = field(init=False)  # memphis-py's nats-py client (it keeps one for the connection's life)

    def __post_init__(self) -> None:
        self.nc = self.memphis.broker_manager

    @property
    def js(self) -> Any:
        return self.memphis.broker_connection

    def lock(self, key: Any) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    async def once(self, cache: dict[K, V], key: K, create: Callable[[], Awaitable[V]]) -> V:
        """``cache[key]``, created once under a per-key lock (memphis-py's creations are unlocked,
        and its consumer() is not cached: one long-lived object per station or group)."""
        found = cache.get(key)
        if found is not None:
            return found
        async with self.lock((id(cache), key)):
            found = cache.get(key)
            if found is None:
                if not self.nc.is_connected:
                    raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
                found = cache[key] = await create()
        return found

    def lost(self) -> asyncio.Future[None]:
        """A future resolved when the current connection drops (checked connected first)."""
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def _fail_in_flight(self) -> None:
        """The connection dropped: waits racing ``lost()`` end, and publishes awaiting their PubAck
        fail at once (else they would wait for their deadline)."""
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self.publisher is not None:
            self.publisher.fail_all(ConnectionLost())

    def watch(self) -> None:
        """Replace memphis-py's callbacks (it prints) with ours: log, and fail calls in flight."""
        nc = self.nc
        nc._error_cb = self._on_error  # instead of nats-py's traceback printer
        nc._disconnected_cb = self._on_disconnected
        nc._reconnected_cb = self._on_reconnected
        nc._closed_cb = self._on_closed

    async def listen_updates(self) -> None:
        """Forget the route and groups of a station the control plane destroyed (an SDK client may
        destroy and re-create it with other partitions): the next call rebuilds them."""
        await self.nc.subscribe(SDK_UPDATES, cb=self._on_update)

    async def _on_update(self, msg: Any) -> None:
        try:
            update = orjson.loads(msg.data)
            if update.get("type") != "remove_station":
                return
            station = internal_name(str(update["station_name"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            return
        self.forget_station(station)

    def forget_station(self, station: str) -> None:
        """Drop the cached route and consumer groups of ``station`` (its internal name)."""
        if self.routes.pop(station, None) is not None:
            log.info("station %s of %s removed: its route will be rebuilt", station, self.label)
        for key in [k for k in self.groups if k[0] == station]:
            stop_group(self.groups.pop(key))

    async def _on_disconnected(self) -> None:
        self._fail_in_flight()
        if self._down_since is None and not self.nc.is_closed:
            self._down_since = time.monotonic()
            log.warning("broker connection of %s lost; reconnecting", self.label)

    async def _on_reconnected(self) -> None:
        down = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        url = self.nc.connected_url
        log.info("broker connection of %s re-established to %s after %.1f s", self.label,
                 url.netloc if url is not None else "?", down)

    async def _on_error(self, exc: Exception) -> None:
        if self._down_since is None:  # while reconnecting, one line per outage is enough
            log.warning("broker connection of %s: %s", self.label, type(exc).__name__ if not str(exc) else exc)
        else:
            log.debug("broker connection of %s: %s", self.label, exc)

    async def _on_closed(self) -> None:
        self._fail_in_flight()


class SessionPool:
    """The open sessions, one per broker identity (``Credentials.identity``).

    A session is opened with one credential; another credential of the same identity (a rotated
    password, a second token) is proven by a connection of its own, which is then closed, and
    shares the session from then on (up to ``MAX_PROVEN`` of them). So whatever a user logs in
    with, the gateway holds one broker connection per user, and a login that fails leaves
    nothing behind."""

    MAX_PROVEN = 16

    def __init__(self, url: str, *, timeout_s: float, idle_s: float, tls: tuple[str, str, str] | None = None) -> None:
        self._tls = tls  # (cert, key, ca): memphis-py's cert_file, key_file, ca_file
        self._servers = parse_servers(url)
        self._host, self._port = self._servers[0]
        self._timeout = timeout_s
        self._idle = idle_s
        self._sessions: dict[str, Session] = {}
        self._connecting: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # identity -> (lock, [waiters])
        self._reaper: asyncio.Task[None] | None = None

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def ready(self, creds: Credentials) -> Session | None:
        """The open session of ``creds`` if there is one (the hot path: no await); else use ``get``."""
        session = self._sessions.get(creds.identity)
        if session is None or not usable(session):
            return None
        return session if session.creds is creds or creds in session.proven else None

    @contextlib.asynccontextmanager
    async def using(self, creds: Credentials) -> AsyncIterator[Session]:
        """The session of ``creds``, marked in use (the reaper leaves it open) until the block ends."""
        session = await self.get(creds)
        session.in_use += 1
        try:
            yield session
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def open(self, creds: Credentials) -> Credentials:
        """Prove ``creds`` (a connection, unless their session already has them) and answer them as
        the broker accepted them: the identity tokens should name."""
        async with self.using(creds) as session:
            if session.creds.identity == creds.identity:
                return creds
            return dataclasses.replace(creds, account_id=session.creds.account_id)  # the bare-user fallback

    async def get(self, creds: Credentials) -> Session:
        """The session of ``creds``' identity, opened (or the credential proven) if need be."""
        session = self.ready(creds)
        if session is not None:
            session.last_used = time.monotonic()
            return session
        session = await self._get(creds)
        session.last_used = time.monotonic()
        return session

    async def _get(self, creds: Credentials) -> Session:
        key = creds.identity
        async with self._connect_lock(key):
            session = self._sessions.get(key)
            if session is not None and not usable(session):  # closed for good (nats-py gave up): replace it
                del self._sessions[key]
                await close_session(session)
                session = None
            if session is not None and (session.creds == creds or creds in session.proven):
                session.proven.add(creds)
                return session
            m, accepted = await self._connect(creds)
            if accepted.identity != key:  # memphis-py fell back to the bare user: the session of that one
                async with self._connect_lock(accepted.identity):
                    return await self._keep(accepted, m)
            return await self._keep(accepted, m)

    async def _keep(self, creds: Credentials, m: Memphis) -> Session:
        """A connection proved ``creds``: it becomes their identity's session, or, if that has one,
        the credential joins it and the new connection is closed."""
        key = creds.identity
        session = self._sessions.get(key)
        if session is not None and usable(session):
            await abandon(m)
            if len(session.proven) >= self.MAX_PROVEN:
                session.proven.clear()
            session.proven.add(creds)
            session.last_used = time.monotonic()
            return session
        session = Session(memphis=m, last_used=time.monotonic(), label=creds.username, creds=creds)
        session.proven.add(creds)
        session.watch()
        await session.listen_updates()
        self._sessions[key] = session
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle())
        return session

    @contextlib.asynccontextmanager
    async def _connect_lock(self, key: str) -> AsyncIterator[None]:
        """One connect at a time per identity; the lock is gone once nobody waits for it (a failed
        login must not leave an entry behind)."""
        entry = self._connecting.get(key)
        if entry is None:
            entry = self._connecting[key] = (asyncio.Lock(), [0])
        lock, waiters = entry
        waiters[0] += 1
        try:
            async with lock:
                yield
        finally:
            waiters[0] -= 1
            if waiters[0] == 0 and self._connecting.get(key) is entry:
                del self._connecting[key]

    async def _connect(self, creds: Credentials) -> tuple[Memphis, Credentials]:
        """A memphis-py connection for ``creds`` (each configured server in turn, each within the
        timeout) and the credentials as the broker accepted them."""
        reasons = []
        for host, port in self._servers:
            if (why := await probe(host, port, min(self._timeout, 2.0))) is not None:
                reasons.append(f"{host}:{port} ({why})")  # memphis-py would retry (and print) forever
                continue
            if creds.connection_token:  # memphis-py has no ping connection for tokens: it would retry
                await check_token(host, port, creds, self._timeout, self._tls)  # a refused token forever
            m = tls_safe(Memphis())
            try:
                async with timeout(self._timeout):  # its ping connection would retry forever
                    await m.connect(
                        host=host,
                        port=port,
                        username=creds.username,
                        account_id=creds.account_id,
                        password=creds.password,
                        connection_token=creds.connection_token,
                        timeout_ms=int(self._timeout * 1000),
                        reconnect=True,
                        max_reconnect=-1,
                        reconnect_interval_ms=int(RECONNECT_WAIT_S * 1000),
                        **tls_files(self._tls),
                    )
            except MemphisError as exc:
                await abandon(m)
                text = str(exc).lower()
                if "authorization" in text or "authentication" in text:
                    raise Unauthenticated(f"broker refused {creds.username}",
                                          why="credentials refused by the broker") from None
                why = tls_failure(exc, f"{host}:{port}", self._tls, suspect_closed=True)  # for the operator's log only
                reasons.append(f"{host}:{port} ({why or exc})")
                continue
            except TimeoutError:
                await abandon(m)
                reasons.append(f"{host}:{port} (no answer within {self._timeout:g} s)")
                continue
            m.parse_descriptor = lambda station, m=m: parse_descriptor(m, station)  # docs/memphis-py.md B9
            log.info("broker connection opened for %s to %s:%d", creds.username, host, port)
            return m, accepted_credentials(m, creds)
        # the addresses are for the operator's log, never for an anonymous caller
        log.warning("broker unavailable: cannot connect to %s", ", ".join(reasons))
        raise Unavailable(BROKER_UNAVAILABLE, retry_after=RETRY_AFTER_S)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self._idle / 2))
            now = time.monotonic()
            for key, session in list(self._sessions.items()):
                if session.in_use == 0 and now - session.last_used > self._idle:
                    del self._sessions[key]
                    await close_session(session)
                    log.info("idle broker connection closed for %s", session.label)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Close every session, giving up after ``timeout_s`` (a dead broker must not hold the exit)."""
        if self._reaper is not None:
            self._reaper.cancel()
        sessions, self._sessions = list(self._sessions.values()), {}
        if not sessions:
            return
        closing = [asyncio.ensure_future(close_session(s)) for s in sessions]
        _, late = await asyncio.wait(closing, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d broker connections did not close within %g s", len(late), timeout_s)


def accepted_credentials(m: Memphis, creds: Credentials) -> Credentials:
    """``creds`` as the broker took them: memphis-py connects as ``<user>$<account>`` and, when the
    broker refuses that, as the bare ``<user>`` (docs/memphis-py.md); a user let in under the bare
    name is the same user whatever account id was asked for, so its account becomes 1."""
    if creds.connection_token or creds.account_id == 1:
        return creds
    user = (getattr(m.broker_manager, "options", None) or {}).get("user")
    if user == creds.username:
        return dataclasses.replace(creds, account_id=1)
    return creds


def usable(session: Session) -> bool:
    """Connected or reconnecting; a connection nats-py closed for good is replaced."""
    return bool(session.memphis.is_connection_active) and not session.nc.is_closed


def stop_group(group: Group) -> None:
    """Cancel the tasks memphis-py's consumer leaves running (docs/memphis-py.md B7)."""
    for name in ("t_ping", "t_dls", "t_consume"):
        task = getattr(group.consumer, name, None)
        if task is not None:
            task.cancel()


async def close_session(session: Session) -> None:
    for group in session.groups.values():  # docs/memphis-py.md B7: close() leaves these running
        stop_group(group)
    if session.publisher is not None:
        await session.publisher.close()
    with contextlib.suppress(Exception):
        await session.memphis.close()
