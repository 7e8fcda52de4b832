"""ProduceService: single, batch and streamed produce, each answered after the broker stored it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache

import orjson
from memgw.v1 import produce_pb2

from gateway.broker.seam import Broker, OutMessage
from gateway.core.errors import InvalidArgument
from gateway.core.headers import EMPTY, MessageHeaders, message_headers, with_headers
from gateway.core.names import station_name, validate_name
from gateway.rpc.call import CallContext

TEXT_TYPES = ("application/json", "application/x-protobuf")
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


def proto_messages(messages: Sequence[produce_pb2.ProducedMessage], headers: MessageHeaders) -> list[OutMessage]:
    """gRPC messages, each with the shared ``headers`` plus its own."""
    return [
        OutMessage(data=m.data, headers=with_headers(headers, m.headers, m.idempotency_key, m.partition_key))
        for m in messages
    ]


def producer_name(name: str) -> str:
    """The request's producer name, checked as Memphis checks names ("": the gateway's own)."""
    if name and (reason := validate_name(name, "producer")):
        raise InvalidArgument(f"invalid producer_name: {reason}")
    return name.lower()


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
        headers = message_headers(
            request.headers, idempotency_key=request.idempotency_key, partition_key=request.partition_key
        )
        is_json = media_type(request.body.content_type) == "application/json"
        message = OutMessage(data=request.body.data, headers=headers, json=is_json)
        [error] = await self._broker.produce(
            ctx.require_principal().credentials, station, [message], producer_name(request.producer_name)
        )
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
            messages = [OutMessage(data=data, headers=headers, json=True) for data in json_elements(request.body.data)]
        else:
            messages = proto_messages(request.messages, headers)
        await self._produce_all(ctx, station, messages, producer_name(request.producer_name))
        return produce_pb2.ProduceBatchResponse(success=True)

    async def ProduceStream(
        self, requests: AsyncIterator[produce_pb2.ProduceStreamRequest], ctx: CallContext
    ) -> produce_pb2.ProduceStreamResponse:
        """Frames are produced as they arrive, a few in flight; the answer sums them up."""
        in_flight: set[asyncio.Task[int]] = set()
        sent = 0
        failures: list[produce_pb2.ProduceBatchFailure] = []

        def collect(done: set[asyncio.Task[int]]) -> None:
            """Count finished frames; every task's outcome is read (none left unretrieved), then
            the first unexpected error is raised."""
            nonlocal sent
            first: BaseException | None = None
            for task in done:
                exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
                if isinstance(exc, InvalidArgument) and isinstance(exc.detail, produce_pb2.ProduceBatchFailure):
                    failures.append(exc.detail)
                    sent += exc.detail.sent
                elif exc is not None:
                    first = first or exc
                else:
                    sent += task.result()
            if first is not None:
                raise first

        try:
            async for frame in requests:
                station = station_name(frame.station)
                ctx.authorize("produce", station)  # each frame names its station
                messages = proto_messages(frame.messages, EMPTY)
                if len(in_flight) >= STREAM_FRAMES_IN_FLIGHT:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
                producer = producer_name(frame.producer_name)
                task = asyncio.create_task(self._produce_all(ctx, station, messages, producer))
                in_flight.add(task)
            if in_flight:
                await asyncio.wait(in_flight)
            done, in_flight = in_flight, set()
            collect(done)
        finally:
            # a failure (or the client going away) ends the call: frames still in flight are
            # cancelled and awaited, so none outlives it and no exception is left unretrieved
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        errors = [e for f in failures for e in f.errors]
        if failures:
            raise InvalidArgument(
                f"{len(errors)} messages failed",
                detail=produce_pb2.ProduceBatchFailure(errors=errors, fail=len(errors), sent=sent, success=False),
            )
        return produce_pb2.ProduceStreamResponse(success=True, sent=sent)

    async def _produce_all(
        self, ctx: CallContext, station: str, messages: list[OutMessage], producer: str = ""
    ) -> int:
        if len(messages) > self._max_batch:
            raise InvalidArgument(f"too many messages in one batch: {len(messages)} > {self._max_batch}")
        if not messages:
            return 0
        errors = await self._broker.produce(ctx.require_principal().credentials, station, messages, producer)
        failed = [e for e in errors if e is not None]
        if failed:
            raise InvalidArgument(
                f"{len(failed)} of {len(messages)} messages failed",
                detail=produce_pb2.ProduceBatchFailure(
                    errors=failed, fail=len(failed), sent=len(messages) - len(failed), success=False
                ),
            )
        return len(messages)
