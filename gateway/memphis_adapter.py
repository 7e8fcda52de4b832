"""The Broker over memphis-py: where every memphis-py bug is worked around.

memphis-py (archived upstream) creates the stations, producers and consumer
groups through Memphis's control plane, so SDK clients and the gateway see the
same stations. The hot paths then use the SDK connection's JetStream context
directly, with the subjects, stream names and headers the SDK itself would use
(../shared/MEMPHIS.md): publishes are pipelined and always awaited for the
broker's acknowledgement, fetches honour the caller's deadline.

Workarounds, by MEMPHIS.md's numbering:
- host "localhost" sleeps 1-2 s in connect: rewritten to 127.0.0.1;
- nats-py's default error callback logs tracebacks on every reconnect: replaced;
- m.producer() / m.consumer() are unlocked and consumer() is uncached: one lock
  and one long-lived object per (user, station[, group]);
- B3: idempotency keys go out as Nats-Msg-Id (stock nats-server) and msg-id;
- B5: payloads go to validators as bytearray;
- B6: schema validators are rebuilt when the station's schema push changes;
- B7: close() leaks consumer tasks: cancelled here;
- B9: protobuf schemas use GetMessageClass instead of the removed GetPrototype;
- fetch() ignores its wait time (5 s fixed): we fetch from the subscriptions.

Broker faults (nats-py reconnects by itself, forever; MEMPHIS.md "Reconnect"):
- while a session's connection is down, produce, fetch and ack fail at once with
  UNAVAILABLE (503) instead of buffering into nats-py's reconnect buffer;
- calls in flight when the connection drops fail at once too (publishes: the
  session fails their futures; fetches and ack flushes race the session's ``lost``
  future), and publish_async futures are always resolved or cancelled, so nats-py's
  4000-slot publish window never leaks;
- memphis-py's connect (its ping connection retries forever with
  max_reconnect=-1) is bounded by the broker timeout;
- ``host1:port1,host2:port2``: a new session tries each server in turn; nats-py
  then also learns the cluster's other servers from the one it reached.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from memphis import Memphis
from memphis.exceptions import MemphisError, MemphisSchemaError
from memphis.station import Station

from gateway.broker import ConsumerSpec, InMessage, OutMessage
from gateway.errors import GatewayError, InvalidArgument, Unauthenticated, Unavailable
from gateway.names import internal_name
from gateway.tokens import Credentials

log = logging.getLogger("gateway.broker")
T = TypeVar("T")

PRODUCER_NAME = "rest-gateway"
RETRY_AFTER_S = 1.0
RECONNECT_WAIT_S = 0.5  # between reconnect attempts to one server: the recovery delay after a restart
SUBSCRIBE_POLL_S = 1.0
DOWN_SHORT = "the connection to the broker is lost and being re-established"
DOWN = f"broker unavailable: {DOWN_SHORT}; retry shortly"
LOST_IN_FLIGHT = (
    "broker unavailable: the connection to the broker was lost before it acknowledged; "
    "the message may or may not be stored (retry with an idempotency key)"
)
HIDDEN_HEADERS = ("$memphis", "Nats-Msg-Id", "msg-id")
ACK, NAK = b"+ACK", b"-NAK"


class ConnectionLost(Exception):
    """Set on the publishes in flight when their connection drops."""


@dataclass(slots=True, kw_only=True)
class _Route:
    """Where one user's produce into one station goes."""

    producer: Any  # memphis.Producer
    subjects: dict[int, str]
    rr: itertools.cycle[int]
    schema_seen: Any = None  # the schema_updates_data entry the validator was built from


@dataclass(slots=True, kw_only=True)
class _Group:
    consumer: Any  # memphis.Consumer
    subscriptions: list[Any]  # nats-py pull subscriptions, one per partition
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_partition: int = 0


@dataclass(slots=True, kw_only=True)
class _Session:
    memphis: Memphis
    last_used: float
    routes: dict[str, _Route] = field(default_factory=dict)
    groups: dict[tuple[str, str], _Group] = field(default_factory=dict)
    locks: dict[Any, asyncio.Lock] = field(default_factory=dict)
    in_use: int = 0
    label: str = ""
    _inflight: set[asyncio.Future[Any]] = field(default_factory=set)  # publishes awaiting their PubAck
    _lost: asyncio.Future[None] | None = None
    _down_since: float | None = None

    @property
    def nc(self) -> Any:
        return self.memphis.broker_manager

    @property
    def js(self) -> Any:
        return self.memphis.broker_connection

    def lock(self, key: Any) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def lost(self) -> asyncio.Future[None]:
        """A future resolved when the current connection drops (checked connected first)."""
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def track(self, future: asyncio.Future[Any]) -> None:
        """A publish to fail at once if the connection drops before its PubAck (else: its deadline)."""
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)

    def _fail_in_flight(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        for future in list(self._inflight):
            if not future.done():
                future.set_exception(ConnectionLost())

    def watch(self) -> None:
        """Replace memphis-py's callbacks (it prints) with ours: log, and fail calls in flight."""
        nc = self.nc
        nc._error_cb = self._on_error  # instead of nats-py's traceback printer
        nc._disconnected_cb = self._on_disconnected
        nc._reconnected_cb = self._on_reconnected
        nc._closed_cb = self._on_closed

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


class MemphisBroker:
    def __init__(self, url: str, *, timeout_s: float, idle_s: float, service_nc: Any = None) -> None:
        self._servers = parse_servers(url)
        self._host, self._port = self._servers[0]
        self._timeout = timeout_s
        self._idle = idle_s
        self._service_nc = service_nc
        self._sessions: dict[Credentials, _Session] = {}
        self._connecting: dict[Credentials, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._draining = False

    # -- sessions ---------------------------------------------------------

    async def open_session(self, creds: Credentials) -> None:
        await self._session(creds)

    async def _session(self, creds: Credentials) -> _Session:
        session = self._sessions.get(creds)
        if session is not None and _usable(session):
            session.last_used = time.monotonic()
            return session
        async with self._connecting.setdefault(creds, asyncio.Lock()):
            session = self._sessions.get(creds)
            if session is None or not _usable(session):
                if session is not None:  # closed for good (nats-py gave up): replace it
                    del self._sessions[creds]
                    await _close_session(session)
                session = _Session(memphis=await self._connect(creds), last_used=time.monotonic(),
                                   label=creds.username)
                session.watch()
                self._sessions[creds] = session
                if self._reaper is None:
                    self._reaper = asyncio.create_task(self._reap_idle())
        return session

    async def _connect(self, creds: Credentials) -> Memphis:
        """A memphis-py connection for ``creds``: each configured server in turn, each within the timeout."""
        reasons = []
        for host, port in self._servers:
            if (why := await _probe(host, port, min(self._timeout, 2.0))) is not None:
                reasons.append(f"{host}:{port} ({why})")  # memphis-py would retry (and print) forever
                continue
            m = Memphis()
            try:
                async with asyncio.timeout(self._timeout):  # its ping connection would retry forever
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
                    )
            except MemphisError as exc:
                await _abandon(m)
                text = str(exc).lower()
                if "authorization" in text or "authentication" in text:
                    raise Unauthenticated(f"broker refused {creds.username}") from None
                reasons.append(f"{host}:{port}")
                continue
            except TimeoutError:
                await _abandon(m)
                reasons.append(f"{host}:{port} (no answer within {self._timeout:g} s)")
                continue
            m.parse_descriptor = lambda station, m=m: _parse_descriptor(m, station)  # B9
            log.info("broker connection opened for %s to %s:%d", creds.username, host, port)
            return m
        raise Unavailable(f"broker unavailable: cannot connect to {', '.join(reasons)}; retry shortly",
                          retry_after=RETRY_AFTER_S)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self._idle / 2))
            now = time.monotonic()
            for creds, session in list(self._sessions.items()):
                if session.in_use == 0 and now - session.last_used > self._idle:
                    del self._sessions[creds]
                    await _close_session(session)
                    log.info("idle broker connection closed for %s", creds.username)

    def begin_drain(self) -> None:
        """Stopping: streams (subscribe) end after their current fetch; other calls go on."""
        self._draining = True

    async def close(self, timeout_s: float = 2.0) -> None:
        """Close every session, giving up after ``timeout_s`` (a dead broker must not hold the exit)."""
        if self._reaper is not None:
            self._reaper.cancel()
        sessions, self._sessions = list(self._sessions.values()), {}
        if not sessions:
            return
        closing = [asyncio.ensure_future(_close_session(s)) for s in sessions]
        _, late = await asyncio.wait(closing, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d broker connections did not close within %g s", len(late), timeout_s)

    # -- produce ----------------------------------------------------------

    async def produce(self, creds: Credentials, station: str, messages: Sequence[OutMessage]) -> list[str | None]:
        session = await self._session(creds)
        session.in_use += 1
        try:
            route = await self._route(session, station)
            return await self._publish_all(session, route, station, messages)
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def _route(self, session: _Session, station: str) -> _Route:
        key = internal_name(station)
        route = session.routes.get(key)
        if route is not None:
            return route
        async with session.lock(("producer", key)):
            route = session.routes.get(key)
            if route is None:
                if not session.nc.is_connected:
                    raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
                m = session.memphis
                producer = await _sdk(m.producer(station_name=station, producer_name=PRODUCER_NAME, timeout_retries=0),
                                      self._timeout)
                partitions = m.partition_producers_updates_data.get(key, {}).get("partitions_list") or []
                streams = {p: f"{key}${p}" for p in partitions} or {0: key}
                functions = m.functions_updates_data.get(key, {})
                subjects = {
                    p: f"{stream}.functions.{functions[str(p)]}" if str(p) in functions else f"{stream}.final"
                    for p, stream in streams.items()
                }
                route = _Route(producer=producer, subjects=subjects, rr=itertools.cycle(sorted(subjects)))
                session.routes[key] = route
        return route

    async def _publish_all(
        self, session: _Session, route: _Route, station: str, messages: Sequence[OutMessage]
    ) -> list[str | None]:
        """Publish every message with all of them in flight, answer once the broker stored them.

        Every publish_async future is resolved before this returns: acknowledged, failed by
        the broker, failed by the session when the connection drops, or cancelled at the
        deadline (nats-py's publish window has 4000 slots per connection: a leaked future
        is a leaked slot).
        """
        if not session.nc.is_connected:
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
        errors: list[str | None] = [None] * len(messages)
        base = {
            "$memphis_producedBy": PRODUCER_NAME,
            "$memphis_connectionId": session.memphis.connection_id or "",
        }
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        js = session.js
        try:
            async with asyncio.timeout(self._timeout):
                for i, message in enumerate(messages):
                    try:
                        payload = await self._validated(session, route, station, message.data)
                    except InvalidArgument as exc:
                        errors[i] = exc.message
                        continue
                    if not session.nc.is_connected:
                        raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
                    headers = {**message.headers, **base}
                    if message.idempotency_key:
                        headers["Nats-Msg-Id"] = headers["msg-id"] = message.idempotency_key
                    subject = route.subjects[self._partition(route, message)]
                    future = await js.publish_async(subject, payload, headers=headers)
                    session.track(future)
                    pending.append((i, future))
                if len(pending) == 1:
                    with contextlib.suppress(Exception):  # looked at below
                        await pending[0][1]
                elif pending:
                    await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        except TimeoutError:
            raise Unavailable(f"broker unavailable: no acknowledgement within {self._timeout:g} s; "
                              "the message may or may not be stored", retry_after=RETRY_AFTER_S) from None
        except (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError, nats.js.errors.TooManyStalledMsgsError):
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S) from None
        finally:
            for _, f in pending:
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()  # retrieved, whatever happens next
        unavailable = False
        for i, f in pending:
            if (failure := f.exception()) is not None:
                errors[i], down = _publish_error(failure)
                unavailable = unavailable or down
        if unavailable:  # the client retries the whole call (idempotency keys make that safe)
            raise Unavailable(next(e for e in errors if e is not None and e.startswith("broker unavailable")),
                              retry_after=RETRY_AFTER_S)
        return errors

    def _partition(self, route: _Route, message: OutMessage) -> int:
        if len(route.subjects) == 1:
            return next(iter(route.subjects))
        if message.partition_key:
            return int(route.producer.get_partition_from_key(message.partition_key))
        return next(route.rr)

    async def _validated(self, session: _Session, route: _Route, station: str, data: bytes) -> bytes | bytearray:
        m = session.memphis
        key = internal_name(station)
        schema = m.schema_updates_data.get(key) or {}
        if not schema:
            return data
        if schema is not route.schema_seen:  # B6: the push replaced the schema; rebuild validators
            m.update_schema_data(station)
            route.schema_seen = schema
        try:
            validated: bytes | bytearray = await Station(m, station).validate_msg(bytearray(data))  # B5
            return validated
        except MemphisSchemaError as exc:
            raise InvalidArgument(_schema_error(str(exc))) from None
        except Exception as exc:
            raise InvalidArgument(_schema_error(f"Schema validation has failed: {exc}")) from None

    # -- consume ----------------------------------------------------------

    async def fetch(
        self, creds: Credentials, spec: ConsumerSpec, batch_size: int, max_wait_s: float
    ) -> list[InMessage]:
        deadline = time.monotonic() + max_wait_s
        session = await self._session(creds)
        session.in_use += 1
        try:
            group = await self._group(session, spec)
            # Concurrent fetches on one consumer are not guaranteed by the SDK: one at a time,
            # but a caller waits for its turn only until its own deadline.
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    await group.lock.acquire()
            except TimeoutError:
                return []
            try:
                msgs = await self._fetch(session, group, batch_size, deadline - time.monotonic())
            finally:
                group.lock.release()
            return await self._hand_out(session, msgs, spec.explicit_ack)
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def subscribe(
        self, creds: Credentials, spec: ConsumerSpec, batch_size: int
    ) -> AsyncIterator[list[InMessage]]:
        """Batches until the caller stops, or the gateway drains (the stream then ends cleanly).

        Fetches are short so that a drain ends the stream within SUBSCRIBE_POLL_S, without
        abandoning messages the broker already delivered (they would wait out their ack time)."""
        while not self._draining:
            batch = await self.fetch(creds, spec, batch_size, SUBSCRIBE_POLL_S)
            if batch:
                yield batch

    async def _group(self, session: _Session, spec: ConsumerSpec) -> _Group:
        key = (internal_name(spec.station), internal_name(spec.group))
        group = session.groups.get(key)
        if group is not None:
            return group
        async with session.lock(("consumer", key)):
            group = session.groups.get(key)
            if group is None:
                if not session.nc.is_connected:
                    raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
                consumer = await _sdk(
                    session.memphis.consumer(
                        station_name=spec.station,
                        consumer_name=spec.consumer_name,
                        consumer_group=spec.group,
                        timeout_retries=0,
                    ),
                    self._timeout,
                )
                subs = [consumer.subscriptions[p] for p in sorted(consumer.subscriptions)]
                group = _Group(consumer=consumer, subscriptions=subs)
                session.groups[key] = group
        return group

    async def _fetch(self, session: _Session, group: _Group, batch_size: int, max_wait_s: float) -> list[Any]:
        if not session.nc.is_connected:
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
        lost = session.lost()
        deadline = time.monotonic() + max_wait_s
        subs = group.subscriptions
        out: list[Any] = []
        while len(out) < batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                break
            sub = subs[group.next_partition % len(subs)]
            group.next_partition += 1
            wait = remaining if len(subs) == 1 else max(remaining / len(subs), 0.05)
            try:  # the connection dropped: what was delivered will be delivered again
                out.extend(await _unless_lost(sub.fetch(batch_size - len(out), timeout=min(wait, remaining)), lost))
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.NoRespondersError,
                    nats.errors.OutboundBufferLimitError, nats.errors.ConnectionReconnectingError,
                    nats.js.errors.ServiceUnavailableError) as exc:
                if out:
                    break
                why = "the consumer group does not answer (no leader?)" if isinstance(
                    exc, (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)) else DOWN_SHORT
                raise Unavailable(f"broker unavailable: {why}; retry shortly", retry_after=RETRY_AFTER_S) from None
        return out

    async def _hand_out(self, session: _Session, msgs: list[Any], explicit: bool) -> list[InMessage]:
        result = [
            InMessage(
                data=msg.data,
                headers={k: v for k, v in (msg.headers or {}).items() if not k.startswith(HIDDEN_HEADERS)},
                ack_id=_encode_ack_id(msg.reply) if explicit else None,
            )
            for msg in msgs
        ]
        if msgs and not explicit:
            await self._send_acks(session, [msg.reply for msg in msgs], ACK)
        return result

    async def _send_acks(self, session: _Session, subjects: Sequence[str], payload: bytes) -> None:
        """Publish acks and wait until the broker has them; the connection lost means redelivery."""
        nc = session.nc
        if not nc.is_connected:
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
        lost = session.lost()
        try:
            for subject in subjects:
                await nc.publish(subject, payload)
            answered = await _ping(nc, self._timeout, lost)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                nats.errors.ConnectionReconnectingError):
            answered = False
        if not answered:
            raise Unavailable(
                "broker unavailable: the connection was lost before the acknowledgement reached the broker; "
                "the messages will be delivered again", retry_after=RETRY_AFTER_S)

    async def ack(self, creds: Credentials, station: str, ack_ids: Sequence[str], nack: bool) -> int:
        session = await self._session(creds)
        key = internal_name(station)
        prefixes = (f"$JS.ACK.{key}$", f"$JS.ACK.{key}.")
        subjects = []
        for ack_id in ack_ids:
            subject = _decode_ack_id(ack_id)
            if subject is None or not subject.startswith(prefixes) or " " in subject:
                continue
            subjects.append(subject)
        if subjects:
            await self._send_acks(session, subjects, NAK if nack else ACK)
        return len(subjects)

    # -- health -----------------------------------------------------------

    async def health(self) -> str | None:
        if self._service_nc is not None:
            if not self._service_nc.is_connected:
                return "broker unavailable: the connection to the broker is lost and being re-established"
            if not await _ping(self._service_nc, min(self._timeout, 2.0)):
                return f"broker unavailable: no answer to a ping within {min(self._timeout, 2.0):g} s"
            return None
        reasons = []
        for host, port in self._servers:
            why = await _probe(host, port, min(self._timeout, 2.0))
            if why is None:
                return None
            reasons.append(f"{host}:{port} ({why})")
        return f"broker unavailable: {', '.join(reasons)}"

    async def storage_bytes(self, creds: Credentials) -> int:
        session = await self._session(creds)
        try:
            info = await session.js.account_info()
        except Exception as exc:
            raise Unavailable(f"broker unavailable: {type(exc).__name__}") from None
        return int(info.storage)


async def _sdk(call: Any, seconds: float) -> Any:
    """Await a memphis-py creation call with our deadline and our error types."""
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError:
        raise Unavailable(f"broker unavailable: no answer within {seconds:g} s", retry_after=RETRY_AFTER_S) from None
    except MemphisError as exc:
        text = str(exc)
        if "timeout" in text.lower() or "no responders" in text.lower() or "connection" in text.lower():
            raise Unavailable(f"broker unavailable: {text}", retry_after=RETRY_AFTER_S) from None
        raise InvalidArgument(text) from None


def _publish_error(exc: BaseException) -> tuple[str, bool]:
    """The client's text for a failed publish, and whether it means the broker is unavailable."""
    if isinstance(exc, ConnectionLost):
        return LOST_IN_FLIGHT, True
    if isinstance(exc, nats.js.errors.NoStreamResponseError):  # before APIError: it is one
        return "broker unavailable: the station's stream does not answer (no leader?); retry shortly", True
    if isinstance(exc, nats.js.errors.APIError):
        if exc.code is not None and exc.code >= 500:
            return f"broker unavailable: {exc.description or exc}", True
        return f"broker refused the message: {exc.description or exc}", False
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError, nats.errors.NoRespondersError,
                        nats.errors.ConnectionClosedError, asyncio.CancelledError)):
        return f"broker unavailable: {type(exc).__name__}", True
    if isinstance(exc, GatewayError):
        return exc.message, False
    return f"produce failed: {type(exc).__name__}", False


def _schema_error(text: str) -> str:
    """memphis-py's text without its "memphis: " prefix and jsonschema's schema dump."""
    text = text.removeprefix("memphis: ").strip()
    return text.split("\n", 1)[0].strip()


def _encode_ack_id(reply: str) -> str:
    return base64.urlsafe_b64encode(reply.encode()).decode().rstrip("=")


def _decode_ack_id(ack_id: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(ack_id + "=" * (-len(ack_id) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def parse_servers(url: str) -> list[tuple[str, int]]:
    """``nats://h1:p1,h2:p2`` (scheme optional, default port 6666) as (host, port) pairs."""
    servers = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        parts = urlsplit(part if "://" in part else f"nats://{part}")
        host = parts.hostname or "127.0.0.1"
        servers.append(("127.0.0.1" if host == "localhost" else host, parts.port or 6666))  # localhost: +1 s
    return servers or [("127.0.0.1", 6666)]


async def _unless_lost(call: Awaitable[T], lost: asyncio.Future[None]) -> T:
    """``await call``, or Unavailable as soon as the connection drops (nats-py would wait out its timeout)."""
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # our caller gave up
        _abandon_task(task)
        raise
    if not task.done():
        _abandon_task(task)
        raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
    return task.result()


def _abandon_task(task: asyncio.Future[Any]) -> None:
    """Cancel, and retrieve whatever it ends with (nats-py may turn the cancellation into an error)."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _ping(nc: Any, seconds: float, lost: asyncio.Future[None] | None = None) -> bool:
    """PING, and whether the PONG came within ``seconds`` (and before ``lost``).

    Instead of nats-py's flush(): on a timeout or a cancellation it cancels its PONG future,
    still queued, and the late PONG then raises InvalidStateError in the connection's read
    loop, which drops the connection. This PONG future is never cancelled."""
    if not nc.is_connected:
        return False
    pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    try:
        await nc._send_ping(pong)
    except Exception:
        return False
    waits: tuple[asyncio.Future[Any], ...] = (pong,) if lost is None else (pong, lost)
    await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    return pong.done()


async def _probe(host: str, port: int, seconds: float) -> str | None:
    """None when a NATS server answers at host:port, else why not (refused, silent, not NATS)."""
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return f"no answer within {seconds:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None if line.startswith(b"INFO ") else "not a NATS server"


def _usable(session: _Session) -> bool:
    """Connected or reconnecting; a connection nats-py closed for good is replaced."""
    return bool(session.memphis.is_connection_active) and not session.nc.is_closed


async def _abandon(m: Memphis) -> None:
    """Close what a failed or timed-out memphis-py connect left open."""
    nc = getattr(m, "broker_manager", None)
    if nc is not None:
        with contextlib.suppress(Exception):
            await nc.close()


def _parse_descriptor(m: Memphis, station: str) -> None:
    """memphis-py's parse_descriptor with protobuf >= 6's GetMessageClass (B9)."""
    active = m.schema_updates_data[station]["active_version"]
    desc_set = descriptor_pb2.FileDescriptorSet()
    desc_set.ParseFromString(base64.b64decode(active["descriptor"]))
    pool = descriptor_pool.DescriptorPool()
    for file in desc_set.file:
        pool.Add(file)
    package = desc_set.file[0].package
    name = f"{package}.{active['message_struct_name']}" if package else active["message_struct_name"]
    m.proto_msgs[station] = GetMessageClass(pool.FindMessageTypeByName(name))()


async def _close_session(session: _Session) -> None:
    for group in session.groups.values():  # B7: close() leaves these running
        for task in (group.consumer.t_ping, group.consumer.t_dls, group.consumer.t_consume):
            if task is not None:
                task.cancel()
    with contextlib.suppress(Exception):
        await session.memphis.close()
