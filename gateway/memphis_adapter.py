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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
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

PRODUCER_NAME = "rest-gateway"
HIDDEN_HEADERS = ("$memphis", "Nats-Msg-Id", "msg-id")
ACK, NAK = b"+ACK", b"-NAK"


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

    @property
    def nc(self) -> Any:
        return self.memphis.broker_manager

    @property
    def js(self) -> Any:
        return self.memphis.broker_connection

    def lock(self, key: Any) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


class MemphisBroker:
    def __init__(self, url: str, *, timeout_s: float, idle_s: float, service_nc: Any = None) -> None:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        host = parts.hostname or "127.0.0.1"
        self._host = "127.0.0.1" if host == "localhost" else host
        self._port = parts.port or 6666
        self._timeout = timeout_s
        self._idle = idle_s
        self._service_nc = service_nc
        self._sessions: dict[Credentials, _Session] = {}
        self._connecting: dict[Credentials, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- sessions ---------------------------------------------------------

    async def open_session(self, creds: Credentials) -> None:
        await self._session(creds)

    async def _session(self, creds: Credentials) -> _Session:
        session = self._sessions.get(creds)
        if session is not None and session.memphis.is_connection_active:
            session.last_used = time.monotonic()
            return session
        async with self._connecting.setdefault(creds, asyncio.Lock()):
            session = self._sessions.get(creds)
            if session is None or not session.memphis.is_connection_active:
                session = _Session(memphis=await self._connect(creds), last_used=time.monotonic())
                self._sessions[creds] = session
                if self._reaper is None:
                    self._reaper = asyncio.create_task(self._reap_idle())
        return session

    async def _connect(self, creds: Credentials) -> Memphis:
        m = Memphis()
        try:
            await m.connect(
                host=self._host,
                port=self._port,
                username=creds.username,
                account_id=creds.account_id,
                password=creds.password,
                connection_token=creds.connection_token,
                timeout_ms=int(self._timeout * 1000),
                reconnect=True,
                max_reconnect=-1,
                reconnect_interval_ms=500,
            )
        except MemphisError as exc:
            text = str(exc).lower()
            if "authorization" in text or "authentication" in text:
                raise Unauthenticated(f"broker refused {creds.username}") from None
            raise Unavailable(f"broker unreachable at {self._host}:{self._port}") from None
        m.broker_manager._error_cb = _log_connection_error  # instead of nats-py's traceback printer
        m.parse_descriptor = lambda station: _parse_descriptor(m, station)  # B9
        log.info("broker connection opened for %s", creds.username)
        return m

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self._idle / 2))
            now = time.monotonic()
            for creds, session in list(self._sessions.items()):
                if session.in_use == 0 and now - session.last_used > self._idle:
                    del self._sessions[creds]
                    await _close_session(session)
                    log.info("idle broker connection closed for %s", creds.username)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(_close_session(s) for s in sessions), return_exceptions=True)

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
        if not session.nc.is_connected:
            raise Unavailable("broker connection lost; reconnecting")
        errors: list[str | None] = [None] * len(messages)
        base = {
            "$memphis_producedBy": PRODUCER_NAME,
            "$memphis_connectionId": session.memphis.connection_id or "",
        }
        pending: list[tuple[int, Any]] = []
        js = session.js
        for i, message in enumerate(messages):
            try:
                payload = await self._validated(session, route, station, message.data)
            except InvalidArgument as exc:
                errors[i] = exc.message
                continue
            headers = {**message.headers, **base}
            if message.idempotency_key:
                headers["Nats-Msg-Id"] = headers["msg-id"] = message.idempotency_key
            subject = route.subjects[self._partition(route, message)]
            if len(messages) == 1:
                pending.append((i, js.publish(subject, payload, timeout=self._timeout, headers=headers)))
            else:
                pending.append((i, await js.publish_async(subject, payload, headers=headers)))
        if not pending:
            return errors
        try:
            async with asyncio.timeout(self._timeout):
                results = await asyncio.gather(*(p for _, p in pending), return_exceptions=True)
        except TimeoutError:
            for _, p in pending:
                if isinstance(p, asyncio.Future):
                    p.cancel()
            raise Unavailable(f"broker did not acknowledge within {self._timeout:g} s") from None
        for (i, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                errors[i] = _publish_error(result)
        if all(e is not None and e.startswith("broker unavailable") for e in errors):
            raise Unavailable(errors[0] or "broker unavailable")
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
            return await Station(m, station).validate_msg(bytearray(data))  # B5: bytearray, not bytes
        except MemphisSchemaError as exc:
            raise InvalidArgument(_schema_error(str(exc))) from None
        except Exception as exc:
            raise InvalidArgument(_schema_error(f"Schema validation has failed: {exc}")) from None

    # -- consume ----------------------------------------------------------

    async def fetch(self, creds: Credentials, spec: ConsumerSpec, batch_size: int, max_wait_s: float) -> list[InMessage]:
        session = await self._session(creds)
        session.in_use += 1
        try:
            group = await self._group(session, spec)
            async with group.lock:  # concurrent fetches on one consumer are not guaranteed by the SDK
                msgs = await self._fetch(session, group, batch_size, max_wait_s)
            return await self._hand_out(session, msgs, spec.explicit_ack)
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def subscribe(self, creds: Credentials, spec: ConsumerSpec, batch_size: int) -> AsyncIterator[list[InMessage]]:
        while True:
            batch = await self.fetch(creds, spec, batch_size, 1.0)
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
            raise Unavailable("broker connection lost; reconnecting")
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
            try:
                out.extend(await sub.fetch(batch_size - len(out), timeout=min(wait, remaining)))
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
                if out:
                    break
                raise Unavailable(f"broker unavailable: {type(exc).__name__}") from None
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
            for msg in msgs:
                await session.nc.publish(msg.reply, ACK)
            await session.nc.flush(timeout=self._timeout)
        return result

    async def ack(self, creds: Credentials, station: str, ack_ids: Sequence[str], nack: bool) -> int:
        session = await self._session(creds)
        key = internal_name(station)
        prefixes = (f"$JS.ACK.{key}$", f"$JS.ACK.{key}.")
        valid = 0
        for ack_id in ack_ids:
            subject = _decode_ack_id(ack_id)
            if subject is None or not subject.startswith(prefixes) or " " in subject:
                continue
            await session.nc.publish(subject, NAK if nack else ACK)
            valid += 1
        if valid:
            await session.nc.flush(timeout=self._timeout)
        return valid

    # -- health -----------------------------------------------------------

    async def health(self) -> str | None:
        if self._service_nc is not None:
            if not self._service_nc.is_connected:
                return "broker connection lost; reconnecting"
            try:
                await self._service_nc.flush(timeout=min(self._timeout, 2.0))
            except Exception as exc:
                return f"broker does not answer: {type(exc).__name__}"
            return None
        try:
            async with asyncio.timeout(min(self._timeout, 2.0)):
                reader, writer = await asyncio.open_connection(self._host, self._port)
                line = await reader.readline()
                writer.close()
        except (OSError, TimeoutError) as exc:
            return f"broker unreachable at {self._host}:{self._port}: {type(exc).__name__}"
        return None if line.startswith(b"INFO ") else "broker answered with something other than NATS"

    async def storage_bytes(self, creds: Credentials) -> int:
        session = await self._session(creds)
        try:
            info = await session.js.account_info()
        except Exception as exc:
            raise Unavailable(f"broker unavailable: {type(exc).__name__}") from None
        return int(info.storage)


async def _sdk(call: Any, timeout: float) -> Any:
    """Await a memphis-py creation call with our deadline and our error types."""
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError:
        raise Unavailable(f"broker did not answer within {timeout:g} s") from None
    except MemphisError as exc:
        text = str(exc)
        if "timeout" in text.lower() or "no responders" in text.lower() or "connection" in text.lower():
            raise Unavailable(f"broker unavailable: {text}") from None
        raise InvalidArgument(text) from None


def _publish_error(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        return f"broker refused the message: {exc.description or exc}"
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError, nats.js.errors.NoStreamResponseError,
                        nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
                        asyncio.CancelledError)):
        return f"broker unavailable: {type(exc).__name__}"
    if isinstance(exc, GatewayError):
        return exc.message
    return f"produce failed: {type(exc).__name__}"


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


async def _log_connection_error(exc: Exception) -> None:
    log.warning("broker connection: %s", type(exc).__name__ if not str(exc) else exc)


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
