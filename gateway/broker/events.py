"""Event streams (server-sent events): a consumer group's messages with a resumable cursor.

A cursor is, per partition, the highest stream sequence the client was sent. Every event carries
the cursor as of that event (its id), so a client that reconnects with its last event id tells
exactly what it received, and nothing else is needed to resume on any replica:

* a message is acknowledged to the group once the transport took it (``yield`` returned);
* a stream opens with a cursor event: the group's delivered position per partition;
* a reconnect with cursor C first replays, by direct reads of the partition streams, what the
  group delivered beyond C (written to the old connection but maybe never received), then
  continues with the group, acknowledging without sending what it delivers at or below the
  position it had when the stream opened (pending messages of the old connection: replayed).

Exact (nothing missed, nothing received twice) when one client reads the group, as an SSE
client with its own consumer_group does; a replay is bounded by REPLAY_LIMIT per partition, and
needs the messages still stored (not for ``ack_based`` retention stations once acknowledged).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors

from gateway.broker.consume import HIDDEN_HEADERS, Consuming, decoded_all
from gateway.broker.sdk import decodable
from gateway.broker.seam import ConsumerSpec, InMessage
from gateway.broker.sessions import SessionPool
from gateway.core.errors import Unavailable
from gateway.core.identity import Credentials
from gateway.core.names import FINAL, internal_name

REPLAY_LIMIT = 10_000
Cursor = dict[int, int]


async def event_stream(
    pool: SessionPool, consuming: Consuming, creds: Credentials, spec: ConsumerSpec, resume: Cursor | None
) -> AsyncIterator[tuple[Cursor, InMessage | None]]:
    """(cursor, message) pairs; the first carries no message. ``spec`` must ask for explicit acks."""
    session = await pool.get(creds)
    group = await consuming.group(session, spec)
    if spec.decode:
        decodable(session.memphis, internal_name(spec.station), spec.station)
    streams: dict[int, str] = {}
    delivered: Cursor = {}
    try:
        for partition, sub in sorted(group.consumer.subscriptions.items()):
            info = await sub.consumer_info()
            streams[int(partition)] = info.stream_name
            delivered[int(partition)] = int(info.delivered.stream_seq or 0)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"broker unavailable: {type(exc).__name__}; retry shortly") from None
    cursor = dict(delivered)
    floor: Cursor = {}  # fresh stream: every delivery is sent (pending ones included)
    yield dict(cursor), None
    if resume is not None:
        floor = dict(delivered)
        for partition, stream in streams.items():
            start = resume.get(partition, delivered[partition])
            for seq in range(start + 1, min(delivered[partition], start + REPLAY_LIMIT) + 1):
                message = await _stored(session.js, stream, seq, partition)
                if message is not None:
                    cursor[partition] = seq
                    if spec.decode:
                        message = (await decoded_all(session, spec, [message]))[0]
                    yield dict(cursor), message
            cursor[partition] = delivered[partition]
    station = spec.station
    while not consuming.draining:
        for message in await consuming.fetch(creds, spec, 100, 1.0):
            assert message.ack_id is not None
            if message.sequence <= floor.get(message.partition, 0):  # replayed above
                await consuming.ack(creds, station, [message.ack_id], False)
                continue
            cursor[message.partition] = max(cursor.get(message.partition, 0), message.sequence)
            yield dict(cursor), message
            await consuming.ack(creds, station, [message.ack_id], False)  # the transport took it


async def _stored(js: Any, stream: str, seq: int, partition: int) -> InMessage | None:
    try:
        raw = await js.get_msg(stream, seq)
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"broker unavailable: {type(exc).__name__}; retry shortly") from None
    if not (raw.subject or "").endswith(f".{FINAL}"):
        return None
    when = raw.time
    return InMessage(
        data=raw.data or b"",
        headers={k: v for k, v in (raw.headers or {}).items() if not k.startswith(HIDDEN_HEADERS)},
        sequence=seq,
        partition=partition,
        timestamp_ns=int(when.timestamp() * 1_000_000) * 1000 if when else 0,
        deliveries=1,
    )
