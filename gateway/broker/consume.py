"""Consume: long-lived consumer groups, fetches that honour the caller's wait, acknowledgements.

One memphis-py Consumer per (user, station, group), created once and kept: destroying
the last consumer of a group on a Memphis server deletes its position. Fetches go to the
group's pull subscriptions directly, since memphis-py's ``fetch()`` ignores its wait time
(a fixed 5 s). Messages fetched beyond what one answer may hold stay unacknowledged in the
group's carry for the next call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import nats.errors
import nats.js.errors

from gateway.broker.ackid import AckIds
from gateway.broker.natsutil import DOWN, DOWN_SHORT, RETRY_AFTER_S, ping, pull, unless_lost
from gateway.broker.routes import Group
from gateway.broker.sdk import decodable, decode_payload, sdk_call
from gateway.broker.seam import ConsumerSpec, InMessage
from gateway.broker.sessions import Session, SessionPool
from gateway.core.deadlines import timeout
from gateway.core.errors import Unavailable
from gateway.core.identity import Credentials
from gateway.core.names import internal_name

log = logging.getLogger("gateway.broker")
SUBSCRIBE_POLL_S = 1.0
HIDDEN_HEADERS = ("$memphis", "Nats-Msg-Id", "msg-id")
ACK, NAK = b"+ACK", b"-NAK"
CARRY_AGE_SHARE = 0.8  # carried messages are handed out within this share of the group's ack wait
MESSAGE_OVERHEAD = 64  # bytes an answer adds per message beyond its data and headers (framing, JSON)
# Decoding: a fetch takes at most 1/DECODE_GROWTH of the answer limit, and a message whose decoded
# form (JSON text or protobuf Value, the larger) passes DECODE_GROWTH times its stored size (plus
# MESSAGE_OVERHEAD) comes back as stored, with a decode_error: answers stay within the limit.
DECODE_GROWTH = 8
DECODE_INLINE_BYTES = 64 * 1024  # payloads decoded on the event loop; more: in a worker thread


class Consuming:
    """The consume half of :class:`gateway.broker.adapter.MemphisBroker`."""

    def __init__(self, pool: SessionPool, timeout_s: float, ack_ids: AckIds) -> None:
        self._pool = pool
        self._timeout = timeout_s
        self._ack_ids = ack_ids
        self.draining = False  # stopping: streams end after their current fetch

    async def fetch(
        self, creds: Credentials, spec: ConsumerSpec, batch_size: int, max_wait_s: float
    ) -> list[InMessage]:
        deadline = time.monotonic() + max_wait_s
        session = await self._pool.get(creds)
        session.in_use += 1
        try:
            group = await self.group(session, spec)  # creating it loads the station's schema
            if spec.decode:
                decodable(session.memphis, internal_name(spec.station), spec.station)
            limit = max(spec.max_bytes // DECODE_GROWTH, 1) if spec.decode and spec.max_bytes else spec.max_bytes
            # Concurrent fetches on one consumer are not guaranteed by the SDK: one at a time,
            # but a caller waits for its turn only until its own deadline.
            try:
                async with timeout(max(deadline - time.monotonic(), 0.001)):
                    await group.lock.acquire()
            except TimeoutError:
                return []
            try:
                carried = take_carried(group, batch_size, time.monotonic())  # beyond what an answer held
                msgs = [msg for _, msg in carried]
                full = bool(limit) and _size(msgs) >= limit
                if len(msgs) < batch_size and not full:
                    wait = deadline - time.monotonic() if not msgs else 0.01
                    room = _pull_bytes(session, limit, msgs)
                    fetched = await self._fetch(session, group, batch_size - len(msgs), wait, room)
                    now = time.monotonic()
                    carried += [(now, msg) for msg in fetched]
                    msgs += fetched
                msgs, _ = _fit(msgs, limit)
                group.carry[:0] = carried[len(msgs):]  # each with the time it was fetched
            finally:
                group.lock.release()
            return await self._hand_out(session, msgs, spec)
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def subscribe(
        self, creds: Credentials, spec: ConsumerSpec, batch_size: int
    ) -> AsyncIterator[list[InMessage]]:
        """Batches until the caller stops, or the gateway drains (the stream then ends cleanly).

        Fetches are short so that a drain ends the stream within SUBSCRIBE_POLL_S, without
        abandoning messages the broker already delivered (they would wait out their ack time)."""
        while not self.draining:
            batch = await self.fetch(creds, spec, batch_size, SUBSCRIBE_POLL_S)
            if batch:
                yield batch

    async def group(self, session: Session, spec: ConsumerSpec) -> Group:
        """The user's consumer of the group (created on first use, then kept)."""
        key = (internal_name(spec.station), internal_name(spec.group))
        return await session.once(session.groups, key, lambda: self._new_group(session, spec))

    async def _new_group(self, session: Session, spec: ConsumerSpec) -> Group:
        options = {  # the group's settings if this creates it; memphis-py's defaults otherwise
            name: value
            for name, value in (
                ("max_msg_deliveries", spec.max_msg_deliveries),
                ("max_ack_time_ms", spec.max_ack_time_ms),
                ("start_consume_from_sequence", spec.start_consume_from_sequence),
                ("last_messages", spec.last_messages),
            )
            if value is not None
        }
        consumer = await sdk_call(
            session.memphis.consumer(
                station_name=spec.station,
                consumer_name=spec.consumer_name,
                consumer_group=spec.group,
                timeout_retries=0,
                **options,
            ),
            self._timeout,
        )
        subscriptions = [consumer.subscriptions[p] for p in sorted(consumer.subscriptions)]
        return Group(consumer=consumer, subscriptions=subscriptions)

    async def _fetch(
        self, session: Session, group: Group, batch_size: int, max_wait_s: float, max_bytes: int
    ) -> list[Any]:
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
                got = await unless_lost(pull(sub, batch_size - len(out), max_bytes, min(wait, remaining)), lost)
                out.extend(got)
                if max_bytes and got:  # the next partition's pull gets what room is left
                    max_bytes = max(max_bytes - _size(got), _largest_message(session))
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

    async def _hand_out(self, session: Session, msgs: list[Any], spec: ConsumerSpec) -> list[InMessage]:
        explicit = spec.explicit_ack
        result = [
            InMessage(
                data=msg.data,
                headers={k: v for k, v in (msg.headers or {}).items() if not k.startswith(HIDDEN_HEADERS)},
                ack_id=self._ack_ids.seal(msg.reply) if explicit else None,
                **(position(msg) if spec.include_metadata else {}),
            )
            for msg in msgs
        ]
        if spec.decode:
            result = await decoded_all(session, spec, result)
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
        subjects = [s for s in (self._ack_ids.open(ack_id, station) for ack_id in ack_ids) if s is not None]
        async with self._pool.using(creds) as session:
            if subjects:
                await self._send_acks(session, subjects, NAK if nack else ACK)
        return len(subjects)


def decoded(session: Session, spec: ConsumerSpec, message: InMessage) -> InMessage:
    """``message`` with its payload decoded by the station's schema (``decoded``, ``data`` then empty)
    or, when it does not decode or its decoded form is too large, as stored with ``decode_error``."""
    allowed = DECODE_GROWTH * (len(message.data) + MESSAGE_OVERHEAD)
    if spec.max_bytes:
        allowed = min(allowed, spec.max_bytes)
    value, error, text_size = decode_payload(session.memphis, internal_name(spec.station), message.data, allowed)
    if value is not None:
        size = max(text_size, value.ByteSize())
        if size <= allowed:
            return replace(message, data=b"", decoded=value)
        error = (f"the decoded message is {size} bytes, more than this answer allows for a stored message of "
                 f"{len(message.data)} bytes; decode the message field yourself")
    return replace(message, decode_error=error)


async def decoded_all(session: Session, spec: ConsumerSpec, messages: list[InMessage]) -> list[InMessage]:
    """:func:`decoded` of each message; in a worker thread when they are large (decoding takes about a
    second per MB of payload: the event loop keeps serving other calls meanwhile)."""
    if sum(len(message.data) for message in messages) <= DECODE_INLINE_BYTES:
        return [decoded(session, spec, message) for message in messages]
    return await asyncio.to_thread(lambda: [decoded(session, spec, message) for message in messages])


def position(msg: Any) -> dict[str, Any]:
    """A JetStream message's sequence, partition, store time and delivery count, from its reply subject.

    Read from nats-py's ``Msg.metadata`` property (memphis-py's ``get_timesent()`` calls it as a
    method and always answers None: docs/memphis-py.md B1)."""
    try:
        meta = msg.metadata
    except Exception:  # not a JetStream message: nothing to tell
        return {}
    stream: str = meta.stream or ""
    _, sep, tail = stream.rpartition("$")
    return {
        "sequence": int(meta.sequence.stream),
        "partition": int(tail) if sep and tail.isdigit() else 0,
        "timestamp_ns": int(meta.timestamp.timestamp() * 1_000_000) * 1000 if meta.timestamp else 0,
        "deliveries": int(meta.num_delivered),
    }


def take_carried(group: Group, n: int, now: float) -> list[tuple[float, Any]]:
    """Up to ``n`` carried messages (with their fetch times), oldest first. Those carried longer
    than the group's ack wait less a margin are dropped, not acknowledged: the broker delivers
    them again once their ack wait ends, and handing them out as well would duplicate them."""
    ack_wait_s = (getattr(group.consumer, "max_ack_time_ms", 0) or 30_000) / 1000
    oldest = now - ack_wait_s * CARRY_AGE_SHARE
    stale = 0
    while stale < len(group.carry) and group.carry[stale][0] < oldest:
        stale += 1
    if stale:
        del group.carry[:stale]
        log.info("dropped %d carried messages older than %.1f s (they will be delivered again)", stale,
                 ack_wait_s * CARRY_AGE_SHARE)
    taken = group.carry[:n]
    del group.carry[:n]
    return taken

def _largest_message(session: Session) -> int:
    """The largest message the broker accepts (its max_payload), plus room for the delivery subject."""
    return int(getattr(session.nc, "max_payload", 0) or 64 * 1024 * 1024) + 4096


def _pull_bytes(session: Session, max_bytes: int, have: list[Any]) -> int:
    """The max_bytes of a pull: the room an answer has left, but never less than the largest
    message (nats-server would never deliver a message bigger than a pull's max_bytes)."""
    if not max_bytes:
        return 0
    return max(max_bytes - _size(have), _largest_message(session))


def _size(msgs: list[Any]) -> int:
    return sum(len(m.data) + MESSAGE_OVERHEAD + sum(len(k) + len(v) for k, v in (m.headers or {}).items())
               for m in msgs)


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
