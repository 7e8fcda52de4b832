"""ProduceService: single, batch and streamed produce, each answered after the broker stored it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache
from typing import Any

import orjson
from memgw.v1 import produce_pb2

from gateway.broker.seam import Broker, OutMessage
from gateway.core import jsonbytes
from gateway.core.errors import InvalidArgument
from gateway.core.headers import EMPTY, MessageHeaders, message_headers, with_headers
from gateway.core.jsondepth import MAX_JSON_DEPTH, too_deep
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


_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_ELEMENT = json.JSONDecoder(parse_constant=_no_constant)


_DEEP_SCAN = 500  # fewer brackets than this cannot nest deeper than Python's json recurses


def json_elements(body: bytes, max_count: int) -> list[bytes]:
    """Each element of a JSON array body, as compact JSON text; at most ``max_count`` of them.

    The array is walked one element at a time (``raw_decode`` parses one value from an offset
    and says where it ends): an element is a Python value only while it is re-encoded, and a
    body with more than ``max_count`` elements is refused as soon as the walk passes the
    limit. Parsing the whole array first made one Python object per element before any
    check: ``[0,0,...]`` (400 KB, 200k elements) grew the gateway by 800 MB.

    A body with few JSON tokens for its size (the usual batch: messages of some size each) is
    parsed at once by orjson instead, which is 4x faster and gives the same bytes (see
    :func:`_parsed_elements`); anything else takes the walk."""
    fast = _parsed_elements(body, max_count)
    if fast is not None:
        return fast
    if body.count(b"[") + body.count(b"{") > _DEEP_SCAN:
        # A body that could nest deeper than Python's json recurses is checked by orjson first (C, no
        # Python recursion; 1024 levels at most), so no client input drives the decoder below into
        # RecursionError, deep in the interpreter's stack.
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if too_deep(exc.msg):
                raise InvalidArgument(f"Invalid request body: JSON nested deeper than {MAX_JSON_DEPTH} levels") \
                    from None  # anything else (integers beyond 64 bits): the walk below decides
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("Invalid request body: not JSON (not UTF-8)") from None
    i = _WS.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("[", i):
        if i == len(text):
            raise InvalidArgument("Invalid request body: not JSON (empty)")
        raise InvalidArgument("Invalid request body: expected a JSON array of messages")
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    out: list[bytes] = []
    if text.startswith("]", i):
        return _only_whitespace_after(text, i + 1, out)
    while True:
        if len(out) == max_count:
            raise InvalidArgument(f"too many messages in one batch: > {max_count}; send at most "
                                  f"{max_count} per request")
        try:
            value, end = _ELEMENT.raw_decode(text, i)
        except ValueError as exc:
            raise InvalidArgument(f"Invalid request body: not JSON ({str(exc).partition(':')[0]})") from None
        except RecursionError:
            raise InvalidArgument(f"Invalid request body: message {len(out)} is nested too deeply") from None
        out.append(_compact(value, len(out)))
        i = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text.startswith("]", i):
            return _only_whitespace_after(text, i + 1, out)
        if not text.startswith(",", i):
            raise InvalidArgument(f"Invalid request body: not JSON (expected ',' or ']' at offset {i})")
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]


_FAST_MAX_TOKENS = 50_000  # what orjson may turn into Python objects at once: a few MB, freed before any await
# One pass tells both: JSON's separators and opening brackets become "t", digits "0", the rest " ".
_TOKENS = bytes(ord("t") if c in b",:[{" else ord("0") if c in b"0123456789" else ord(" ") for c in range(256))
_LONG_NUMBER = b"0" * 19  # may be beyond 64 bits, which orjson would make a float


def _parsed_elements(body: bytes, max_count: int) -> list[bytes] | None:
    """The elements, compact, from one orjson parse; None when the walk must decide.

    Only for bodies whose Python objects stay few: at most ``_FAST_MAX_TOKENS`` separators
    and brackets (each value but a container's first follows one); they live only until this
    synchronous call returns, so one such body at a time. The result is the walk's: both parse
    exact JSON into the same values (last duplicate key wins, floats correctly rounded) and
    re-encode with orjson. Where they could differ the walk decides: any orjson error (its
    message differs; ``1e400``, lone surrogates), numbers of 19 digits or more (orjson makes
    integers beyond 64 bits floats), a body that is not an array or has too many elements."""
    shape = body.translate(_TOKENS)
    tokens = shape.count(b"t")
    if tokens > _FAST_MAX_TOKENS or _LONG_NUMBER in shape:
        return None
    try:
        values = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(values) is not list or len(values) > max_count:
        return None
    try:
        return [jsonbytes.dumps(value) for value in values]
    except TypeError:  # nesting beyond orjson's 254 levels: the walk says which message
        return None


def _only_whitespace_after(text: str, i: int, out: list[bytes]) -> list[bytes]:
    if _WS.match(text, i).end() != len(text):  # type: ignore[union-attr]
        raise InvalidArgument(f"Invalid request body: not JSON (extra data at offset {i})")
    return out


def _compact(value: Any, index: int) -> bytes:
    try:
        return jsonbytes.dumps(value)
    except TypeError:  # integers beyond 64 bits, nesting beyond orjson's 254 levels, lone surrogates
        pass
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except RecursionError:
        raise InvalidArgument(f"Invalid request body: message {index} is nested too deeply") from None
    except UnicodeEncodeError:
        raise InvalidArgument(f"Invalid request body: message {index} holds an unpaired surrogate escape") from None


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
            elements = json_elements(request.body.data, self._max_batch)
            messages = [OutMessage(data=data, headers=headers, json=True) for data in elements]
        else:
            self._check_count(len(request.messages))
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
                self._check_count(len(frame.messages))
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

    def _check_count(self, count: int) -> None:
        """Refuse an oversized batch by its count, before a message is built for any element."""
        if count > self._max_batch:
            raise InvalidArgument(f"too many messages in one batch: {count} > {self._max_batch}; send at most "
                                  f"{self._max_batch} per request")

    async def _produce_all(
        self, ctx: CallContext, station: str, messages: list[OutMessage], producer: str = ""
    ) -> int:
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
