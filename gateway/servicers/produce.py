"""ProduceService: single, batch and streamed produce, each answered after the broker stored it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache

import orjson
from memgw.v1 import produce_pb2

from gateway.broker import Broker, OutMessage
from gateway.calls import CallContext
from gateway.errors import InvalidArgument
from gateway.servicers.common import header_lookup, message_headers, station_name

TEXT_TYPES = ("application/json", "application/x-protobuf")
IDEMPOTENCY_HEADERS = header_lookup("Idempotency-Key", "msg-id", "Nats-Msg-Id")
PARTITION_HEADERS = header_lookup("Partition-Key")
KEY_HEADERS = IDEMPOTENCY_HEADERS | PARTITION_HEADERS
STREAM_FRAMES_IN_FLIGHT = 4


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


@lru_cache(maxsize=256)
def check_content_type(content_type: str, accepted: tuple[str, ...], prefix: str | None) -> None:
    """InvalidArgument (415) unless ``content_type`` is accepted (accepted ones are cached)."""
    media = media_type(content_type)
    if media in accepted or (prefix is not None and media.startswith(prefix)):
        return
    allowed = ", ".join([f"{prefix}*", *accepted] if prefix else accepted)
    shown = f"'{media}'" if media else "none"
    raise InvalidArgument(f"unsupported content type {shown}: use one of {allowed}", http_status=415)


def out_message(
    data: bytes, headers: dict[str, str], idempotency_key: str = "", partition_key: str = ""
) -> OutMessage:
    """A message to produce; ``headers`` is shared, not copied (messages of a batch share one dict).

    A key not given explicitly comes from the first header naming it (Idempotency-Key, Partition-Key)."""
    if headers and not (idempotency_key and partition_key):
        for key, value in headers.items():
            lower = key.lower()
            if lower not in KEY_HEADERS:
                continue
            if lower in IDEMPOTENCY_HEADERS:
                idempotency_key = idempotency_key or value
            else:
                partition_key = partition_key or value
    return OutMessage(data=data, headers=headers, idempotency_key=idempotency_key, partition_key=partition_key)


def json_elements(body: bytes) -> list[bytes]:
    """Each element of a JSON array body, as compact JSON text."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(body)  # integers beyond 64 bits
        except ValueError:
            raise InvalidArgument("Invalid request body: not JSON") from None
    if not isinstance(value, list):
        raise InvalidArgument("Invalid request body: expected a JSON array of messages")
    out = []
    for element in value:
        try:
            out.append(orjson.dumps(element))
        except TypeError:
            out.append(json.dumps(element, separators=(",", ":"), ensure_ascii=False).encode())
    return out


def proto_messages(
    messages: Sequence[produce_pb2.ProducedMessage], headers: dict[str, str]
) -> list[OutMessage]:
    """gRPC messages, each with the shared ``headers`` plus its own."""
    return [
        out_message(
            m.data, {**headers, **message_headers(m.headers)} if m.headers else headers, m.idempotency_key,
            m.partition_key,
        )
        for m in messages
    ]


class ProduceService:
    SERVICE = "memgw.v1.ProduceService"

    def __init__(self, broker: Broker, max_batch: int) -> None:
        self._broker = broker
        self._max_batch = max_batch

    async def ProduceSingle(
        self, request: produce_pb2.ProduceSingleRequest, ctx: CallContext
    ) -> produce_pb2.ProduceSingleResponse:
        station = station_name(request.station)
        check_content_type(request.body.content_type, TEXT_TYPES, "text/")
        message = out_message(
            request.body.data, message_headers(request.headers), request.idempotency_key, request.partition_key
        )
        [error] = await self._broker.produce(ctx.require_principal().credentials, station, [message])
        if error is not None:
            raise InvalidArgument(error)
        return produce_pb2.ProduceSingleResponse(success=True)

    async def ProduceBatch(
        self, request: produce_pb2.ProduceBatchRequest, ctx: CallContext
    ) -> produce_pb2.ProduceBatchResponse:
        station = station_name(request.station)
        headers = message_headers(request.headers)
        if request.HasField("body"):
            check_content_type(request.body.content_type, ("application/json",), None)
            messages = [out_message(data, headers) for data in json_elements(request.body.data)]
        else:
            messages = proto_messages(request.messages, headers)
        await self._produce_all(ctx, station, messages)
        return produce_pb2.ProduceBatchResponse(success=True)

    async def ProduceStream(
        self, requests: AsyncIterator[produce_pb2.ProduceStreamRequest], ctx: CallContext
    ) -> produce_pb2.ProduceStreamResponse:
        """Frames are produced as they arrive, a few in flight; the answer sums them up."""
        in_flight: set[asyncio.Task[int]] = set()
        sent = 0
        failures: list[produce_pb2.ProduceBatchFailure] = []

        def collect(task: asyncio.Task[int]) -> None:
            nonlocal sent
            exc = task.exception()
            if isinstance(exc, InvalidArgument) and isinstance(exc.detail, produce_pb2.ProduceBatchFailure):
                failures.append(exc.detail)
                sent += exc.detail.sent
            elif exc is not None:
                raise exc
            else:
                sent += task.result()

        try:
            async for frame in requests:
                station = station_name(frame.station)
                messages = proto_messages(frame.messages, {})
                if len(in_flight) >= STREAM_FRAMES_IN_FLIGHT:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        collect(task)
                task = asyncio.create_task(self._produce_all(ctx, station, messages))
                in_flight.add(task)
            if in_flight:
                await asyncio.wait(in_flight)
            done, in_flight = in_flight, set()
            for task in done:
                collect(task)
        finally:
            for task in in_flight:
                task.cancel()
        errors = [e for f in failures for e in f.errors]
        if failures:
            raise InvalidArgument(
                f"{len(errors)} messages failed",
                detail=produce_pb2.ProduceBatchFailure(errors=errors, fail=len(errors), sent=sent, success=False),
            )
        return produce_pb2.ProduceStreamResponse(success=True, sent=sent)

    async def _produce_all(self, ctx: CallContext, station: str, messages: list[OutMessage]) -> int:
        if len(messages) > self._max_batch:
            raise InvalidArgument(f"too many messages in one batch: {len(messages)} > {self._max_batch}")
        if not messages:
            return 0
        errors = await self._broker.produce(ctx.require_principal().credentials, station, messages)
        failed = [e for e in errors if e is not None]
        if failed:
            raise InvalidArgument(
                f"{len(failed)} of {len(messages)} messages failed",
                detail=produce_pb2.ProduceBatchFailure(
                    errors=failed, fail=len(failed), sent=len(messages) - len(failed), success=False
                ),
            )
        return len(messages)
