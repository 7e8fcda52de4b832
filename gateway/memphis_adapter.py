"""The Broker over memphis-py: where every memphis-py bug is worked around.

memphis-py (archived upstream) creates the stations, producers and consumer
groups through Memphis's control plane, so SDK clients and the gateway see the
same stations. The hot paths then use the SDK connection directly, with the
subjects, stream names and headers the SDK itself would use (../shared/MEMPHIS.md):
publishes are pipelined (gateway.publisher) and always awaited for the broker's
acknowledgement, fetches honour the caller's deadline. Connections, and what
happens when they drop, live in gateway.sessions.

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
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from memphis.exceptions import MemphisError, MemphisSchemaError
from memphis.station import Station

from gateway.broker import ConsumerSpec, InMessage, OutMessage
from gateway.errors import InvalidArgument, Unavailable
from gateway.names import internal_name
from gateway.publisher import HEADER_LINE, UNAVAILABLE, Publisher, encode_headers
from gateway.sessions import (
    DOWN,
    DOWN_SHORT,
    RETRY_AFTER_S,
    ConnectionLost,
    Group,
    Route,
    Session,
    SessionPool,
    parse_servers,
    ping,
    probe,
    unless_lost,
)
from gateway.tokens import Credentials

PRODUCER_NAME = "rest-gateway"
SUBSCRIBE_POLL_S = 1.0
LOST_IN_FLIGHT = (
    "broker unavailable: the connection to the broker was lost before it acknowledged; "
    "the message may or may not be stored (retry with an idempotency key)"
)
HIDDEN_HEADERS = ("$memphis", "Nats-Msg-Id", "msg-id")
ACK, NAK = b"+ACK", b"-NAK"
MESSAGE_OVERHEAD = 64  # bytes an answer adds per message beyond its data and headers (framing, JSON)


class MemphisBroker:
    def __init__(self, url: str, *, timeout_s: float, idle_s: float, service_nc: Any = None) -> None:
        self._pool = SessionPool(url, timeout_s=timeout_s, idle_s=idle_s)
        self._servers = parse_servers(url)
        self._timeout = timeout_s
        self._service_nc = service_nc
        self._draining = False

    async def open_session(self, creds: Credentials) -> None:
        await self._pool.get(creds)

    def sessions(self) -> list[Session]:
        """The open user sessions (for tests and diagnostics)."""
        return self._pool.all()

    def begin_drain(self) -> None:
        """Stopping: streams (subscribe) end after their current fetch; other calls go on."""
        self._draining = True

    async def close(self, timeout_s: float = 2.0) -> None:
        await self._pool.close(timeout_s)

    # -- produce ----------------------------------------------------------

    async def produce(self, creds: Credentials, station: str, messages: Sequence[OutMessage]) -> list[str | None]:
        session = self._pool.ready(creds) or await self._pool.get(creds)
        session.in_use += 1
        try:
            key = internal_name(station)
            route = session.routes.get(key) or await self._route(session, station, key)
            return await self._publish_all(session, route, station, key, messages)
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def _route(self, session: Session, station: str, key: str) -> Route:
        return await session.once(session.routes, key, lambda: self._new_route(session, station, key))

    async def _new_route(self, session: Session, station: str, key: str) -> Route:
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
        # the headers memphis-py adds to every message, encoded once
        base = encode_headers({"$memphis_producedBy": PRODUCER_NAME,
                               "$memphis_connectionId": m.connection_id or ""})[len(HEADER_LINE):-2]
        return Route(producer=producer, subjects=subjects, rr=itertools.cycle(sorted(subjects)), base_headers=base,
                     only_subject=next(iter(subjects.values())) if len(subjects) == 1 else "")

    async def _publish_all(
        self, session: Session, route: Route, station: str, key: str, messages: Sequence[OutMessage]
    ) -> list[str | None]:
        """Publish every message with all of them in flight; answer once the broker stored them.

        The publisher fails the batch at once when the connection drops (the session tells it);
        the deadline fails it otherwise. Either way the client hears 503 and may retry
        (idempotency keys make that safe)."""
        if not session.nc.is_connected:
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
        errors: list[str | None] = [None] * len(messages)
        blocks: dict[int, bytes] = {}  # header block per distinct headers dict (a batch shares one)
        items: list[tuple[str, bytes, bytes]] = []  # (subject, header block, payload)
        positions: list[int] = []
        validate = self._schema(session, route, station, key) is not None
        for i, message in enumerate(messages):
            payload = message.data
            if validate:
                try:
                    payload = bytes(await self._validated(session, station, payload))
                except InvalidArgument as exc:
                    errors[i] = exc.message
                    continue
            if message.idempotency_key:
                msg_id = message.idempotency_key
                block = encode_headers({**message.headers, "Nats-Msg-Id": msg_id, "msg-id": msg_id}, route.base_headers)
            else:
                block = blocks.get(id(message.headers)) or blocks.setdefault(
                    id(message.headers), encode_headers(message.headers, route.base_headers))
            subject = route.only_subject or route.subjects[self._partition(route, message)]
            items.append((subject, block, payload))
            positions.append(i)
        if not items:
            return errors
        if session.publisher is None:
            session.publisher = Publisher(session.nc)
        try:
            results = await session.publisher.publish(items, self._timeout)
        except TimeoutError:
            raise Unavailable(f"broker unavailable: no acknowledgement within {self._timeout:g} s; "
                              "the message may or may not be stored", retry_after=RETRY_AFTER_S) from None
        except ConnectionLost:
            raise Unavailable(LOST_IN_FLIGHT, retry_after=RETRY_AFTER_S) from None
        except (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError):
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S) from None
        if len(positions) == len(messages):
            errors = results
        else:
            for i, error in zip(positions, results, strict=True):
                errors[i] = error
        if any(results):
            down = next((e for e in results if e is not None and e.startswith(UNAVAILABLE)), None)
            if down is not None:  # the client retries the whole call (idempotency keys make that safe)
                raise Unavailable(down, retry_after=RETRY_AFTER_S)
        return errors

    def _partition(self, route: Route, message: OutMessage) -> int:
        if message.partition_key:
            return int(route.producer.get_partition_from_key(message.partition_key))
        return next(route.rr)

    @staticmethod
    def _schema(session: Session, route: Route, station: str, key: str) -> Any:
        """The station's schema (None without one), validators rebuilt when its push changed it (B6)."""
        m = session.memphis
        schema = m.schema_updates_data.get(key) or None
        if schema is not None and schema is not route.schema_seen:
            m.update_schema_data(station)
            route.schema_seen = schema
        return schema

    async def _validated(self, session: Session, station: str, data: bytes) -> bytes | bytearray:
        try:
            validated: bytes | bytearray = await Station(session.memphis, station).validate_msg(bytearray(data))  # B5
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
        session = await self._pool.get(creds)
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
                msgs = group.carry[:batch_size]  # fetched earlier, beyond what an answer could hold
                del group.carry[:batch_size]
                if len(msgs) < batch_size:
                    wait = deadline - time.monotonic() if not msgs else 0.01
                    msgs += await self._fetch(session, group, batch_size - len(msgs), wait)
                msgs, group.carry[:0] = _fit(msgs, spec.max_bytes)
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

    async def _group(self, session: Session, spec: ConsumerSpec) -> Group:
        key = (internal_name(spec.station), internal_name(spec.group))
        return await session.once(session.groups, key, lambda: self._new_group(session, spec))

    async def _new_group(self, session: Session, spec: ConsumerSpec) -> Group:
        consumer = await _sdk(
            session.memphis.consumer(
                station_name=spec.station,
                consumer_name=spec.consumer_name,
                consumer_group=spec.group,
                timeout_retries=0,
            ),
            self._timeout,
        )
        subscriptions = [consumer.subscriptions[p] for p in sorted(consumer.subscriptions)]
        return Group(consumer=consumer, subscriptions=subscriptions)

    async def _fetch(self, session: Session, group: Group, batch_size: int, max_wait_s: float) -> list[Any]:
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
                out.extend(await unless_lost(sub.fetch(batch_size - len(out), timeout=min(wait, remaining)), lost))
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

    async def _hand_out(self, session: Session, msgs: list[Any], explicit: bool) -> list[InMessage]:
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

    async def _send_acks(self, session: Session, subjects: Sequence[str], payload: bytes) -> None:
        """Publish acks and wait until the broker has them; the connection lost means redelivery."""
        nc = session.nc
        if not nc.is_connected:
            raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
        lost = session.lost()
        try:
            for subject in subjects:
                await nc.publish(subject, payload)
            answered = await ping(nc, self._timeout, lost)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                nats.errors.ConnectionReconnectingError):
            answered = False
        if not answered:
            raise Unavailable(
                "broker unavailable: the connection was lost before the acknowledgement reached the broker; "
                "the messages will be delivered again", retry_after=RETRY_AFTER_S)

    async def ack(self, creds: Credentials, station: str, ack_ids: Sequence[str], nack: bool) -> int:
        session = await self._pool.get(creds)
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
        session = await self._pool.get(creds)
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


def _fit(msgs: list[Any], max_bytes: int) -> tuple[list[Any], list[Any]]:
    """(what fits in an answer of ``max_bytes``, the rest); at least one message (0: no limit).

    The rest stays unacknowledged in the group's carry for the next call (a gRPC answer cannot
    exceed its message limit; acking and then failing to send would lose messages, and a nack
    would spend one of their max_msg_deliveries)."""
    if not max_bytes:
        return msgs, []
    size = 0
    for i, msg in enumerate(msgs):
        size += len(msg.data) + MESSAGE_OVERHEAD + sum(len(k) + len(v) for k, v in (msg.headers or {}).items())
        if size > max_bytes and i > 0:
            return msgs[:i], msgs[i:]
    return msgs, []


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
