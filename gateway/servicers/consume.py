"""ConsumeService: batches, streams and explicit acknowledgement through consumer groups."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from google.protobuf.timestamp_pb2 import Timestamp
from memgw.v1 import consume_pb2

from gateway.broker.seam import Broker, ConsumerSpec, InMessage
from gateway.core.errors import InvalidArgument
from gateway.core.names import station_name, validate_name
from gateway.rpc.call import CallContext

DEFAULT_GROUP = "rest-gateway"
DEFAULT_BATCH = 10
DEFAULT_WAIT_MS = 5000
DEFAULT_STREAM_BATCH = 100
MAX_ACK_IDS = 5000


def group_name(requested: str) -> str:
    """The Memphis REST gateway's mapping: g -> "g-rest-gateway", none -> "rest-gateway"."""
    return f"{requested}-{DEFAULT_GROUP}" if requested else DEFAULT_GROUP


def consumer_spec(station: str, consumer_name: str, group: str, ack_mode: int, max_bytes: int = 0) -> ConsumerSpec:
    if not consumer_name:
        raise InvalidArgument("Consumer name is required")
    for kind, name in (("consumer", consumer_name), ("consumer group", group)):
        reason = validate_name(name, kind) if name else None
        if reason is not None:
            raise InvalidArgument(f"invalid {kind} name: {reason}")
    return ConsumerSpec(
        station=station_name(station),
        consumer_name=consumer_name.lower(),
        group=group_name(group.lower()),
        explicit_ack=ack_mode == consume_pb2.ACK_MODE_EXPLICIT,
        max_bytes=max_bytes,
    )


MAX_DELIVERIES = 10  # the Memphis server's clamp


def with_options(
    spec: ConsumerSpec,
    request: consume_pb2.ConsumeBatchRequest | consume_pb2.SubscribeRequest | consume_pb2.ConsumeEventsRequest,
) -> ConsumerSpec:
    """The request's metadata and decode flags and consumer group settings (used when the group is created)."""
    def opt(field: str) -> int | None:
        return int(getattr(request, field)) if request.HasField(field) else None

    deliveries, ack_ms = opt("max_msg_deliveries"), opt("max_ack_time_ms")
    start, last = opt("start_consume_from_sequence"), opt("last_messages")
    if deliveries is not None and not 1 <= deliveries <= MAX_DELIVERIES:
        raise InvalidArgument(f"max_msg_deliveries must be between 1 and {MAX_DELIVERIES}")
    if ack_ms is not None and ack_ms < 1:
        raise InvalidArgument("max_ack_time_ms must be at least 1")
    if start is not None and start < 1:
        raise InvalidArgument("start_consume_from_sequence must be at least 1")
    if last is not None and last < -1:
        raise InvalidArgument("last_messages must be -1 (off), 0 (new messages only) or more")
    if start is not None and start > 1 and last is not None and last >= 0:
        raise InvalidArgument("start_consume_from_sequence and last_messages can not both be set")
    metadata = True if isinstance(request, consume_pb2.ConsumeEventsRequest) else request.include_metadata
    return replace(spec, include_metadata=metadata, decode=request.decode, max_msg_deliveries=deliveries,
                   max_ack_time_ms=ack_ms, start_consume_from_sequence=start, last_messages=last)


_CURSOR = re.compile(r"\d{1,5}:\d{1,20}(,\d{1,5}:\d{1,20}){0,9999}")


def parse_cursor(text: str) -> dict[int, int] | None:
    """An event id ("partition:sequence[,...]") as a cursor; None for none."""
    text = text.strip()
    if not text:
        return None
    if len(text) > 300_000 or not _CURSOR.fullmatch(text):
        raise InvalidArgument("last event id: expected the id of an event of this stream (\"partition:sequence,...\")")
    return {int(p): int(s) for p, s in (part.split(":") for part in text.split(","))}


def cursor_text(cursor: dict[int, int]) -> str:
    return ",".join(f"{p}:{s}" for p, s in sorted(cursor.items()))


def consumed(messages: Sequence[InMessage]) -> list[consume_pb2.ConsumedMessage]:
    return [consumed_one(m) for m in messages]


def consumed_one(m: InMessage) -> consume_pb2.ConsumedMessage:
    reply = consume_pb2.ConsumedMessage(message=m.data, headers=m.headers, ack_id=m.ack_id)
    if m.sequence:
        when = Timestamp()
        when.FromNanoseconds(m.timestamp_ns)
        reply.sequence, reply.partition, reply.deliveries = m.sequence, m.partition, m.deliveries
        reply.timestamp.CopyFrom(when)
    if m.decoded is not None:
        reply.decoded.CopyFrom(m.decoded)
    elif m.decode_error:
        reply.decode_error = m.decode_error
    return reply


class ConsumeService:
    SERVICE = "memgw.v1.ConsumeService"

    def __init__(
        self, broker: Broker, max_batch: int, max_wait_ms: int, max_answer_bytes: int = 0, max_message_bytes: int = 0
    ) -> None:
        self._broker = broker
        self._max_batch = max_batch
        self._max_wait_ms = max_wait_ms
        self._max_bytes = max_answer_bytes  # every answer, REST or gRPC (0: no limit)
        # a gRPC answer must also fit the gRPC message limit
        self._max_grpc_bytes = min(b for b in (max_answer_bytes, max_message_bytes) if b) if (
            max_answer_bytes or max_message_bytes) else 0

    async def ConsumeBatch(
        self, request: consume_pb2.ConsumeBatchRequest, ctx: CallContext
    ) -> consume_pb2.ConsumeBatchResponse:
        spec = with_options(consumer_spec(
            request.station, request.consumer_name, request.consumer_group, request.ack_mode, self._answer_limit(ctx)
        ), request)
        batch = self._batch_size(
            request.batch_size if request.HasField("batch_size") else min(DEFAULT_BATCH, self._max_batch)
        )
        # The default is capped by the limit: only a wait the client asked for can be refused.
        wait_ms = (request.batch_max_wait_time_ms if request.HasField("batch_max_wait_time_ms")
                   else min(DEFAULT_WAIT_MS, self._max_wait_ms))
        if wait_ms > self._max_wait_ms:
            raise InvalidArgument(f"batch_max_wait_time_ms must be at most {self._max_wait_ms}")
        wait_s = max(wait_ms, 1) / 1000
        remaining = ctx.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, with what there is
            wait_s = max(min(wait_s, remaining - 0.25), 0.001)
        messages = await self._broker.fetch(ctx.require_principal().credentials, spec, batch, wait_s)
        return consume_pb2.ConsumeBatchResponse(messages=consumed(messages))

    async def Ack(self, request: consume_pb2.AckRequest, ctx: CallContext) -> consume_pb2.AckResponse:
        station = station_name(request.station)
        if not request.ack_ids:
            raise InvalidArgument("ack_ids is required")
        if len(request.ack_ids) > MAX_ACK_IDS:
            raise InvalidArgument(f"at most {MAX_ACK_IDS} ack_ids at once")
        acked = await self._broker.ack(ctx.require_principal().credentials, station, request.ack_ids, request.nack)
        return consume_pb2.AckResponse(success=True, acked=acked)

    async def Subscribe(
        self, request: consume_pb2.SubscribeRequest, ctx: CallContext
    ) -> AsyncIterator[consume_pb2.SubscribeResponse]:
        spec = with_options(consumer_spec(
            request.station, request.consumer_name, request.consumer_group, request.ack_mode, self._answer_limit(ctx)
        ), request)
        batch = self._batch_size(
            request.batch_size if request.HasField("batch_size") else min(DEFAULT_STREAM_BATCH, self._max_batch)
        )
        async for messages in self._broker.subscribe(ctx.require_principal().credentials, spec, batch):
            yield consume_pb2.SubscribeResponse(messages=consumed(messages))

    async def ConsumeEvents(
        self, request: consume_pb2.ConsumeEventsRequest, ctx: CallContext
    ) -> AsyncIterator[consume_pb2.ConsumeEventsResponse]:
        spec = with_options(
            consumer_spec(request.station, request.consumer_name, request.consumer_group,
                          consume_pb2.ACK_MODE_EXPLICIT),
            request,
        )
        resume = parse_cursor(request.last_event_id or ctx.metadata.get("last-event-id", ""))
        async for cursor, message in self._broker.events(ctx.require_principal().credentials, spec, resume):
            if message is None:
                yield consume_pb2.ConsumeEventsResponse(id=cursor_text(cursor))
            else:
                reply = consumed_one(message)
                reply.ClearField("ack_id")  # acknowledged by the stream itself
                yield consume_pb2.ConsumeEventsResponse(id=cursor_text(cursor), message=reply)

    def _answer_limit(self, ctx: CallContext) -> int:
        """The most bytes of messages one answer holds: a REST answer is buffered whole (and its
        fetch passes through the user's broker connection), a gRPC one cannot pass the message limit."""
        return self._max_grpc_bytes if ctx.protocol == "grpc" else self._max_bytes

    def _batch_size(self, size: int) -> int:
        if not 1 <= size <= self._max_batch:
            raise InvalidArgument(f"batch_size must be between 1 and {self._max_batch}")
        return size
