"""DeadLetterService: a station's dead letters (poison messages, schema refusals): list, resend, purge."""

from __future__ import annotations

from datetime import UTC, datetime

from memgw.v1 import deadletters_pb2

from gateway.broker.catalogseam import DeadLetterState, DeadLetterStore
from gateway.core.errors import InvalidArgument
from gateway.rpc.call import CallContext

MAX_RESEND_IDS = 1000


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else ""


def letter_message(d: DeadLetterState) -> deadletters_pb2.DeadLetter:
    return deadletters_pb2.DeadLetter(
        id=d.id, reason=d.reason, message=d.data.decode(errors="replace"), data=d.data, headers=d.headers,
        consumer_group=d.group, deliveries=d.deliveries, partition=d.partition, sequence=d.sequence,
        validation_error=d.validation_error, producer_name=d.producer_name, timestamp=_time(d.stored_at),
    )


def _station(station: str) -> str:
    if not station:
        raise InvalidArgument("station is required")
    return station


class DeadLetterService:
    SERVICE = "memgw.v1.DeadLetterService"

    def __init__(self, store: DeadLetterStore) -> None:
        self._store = store

    async def ListDeadLetters(
        self, request: deadletters_pb2.ListDeadLettersRequest, ctx: CallContext
    ) -> deadletters_pb2.ListDeadLettersResponse:
        ctx.require_principal()
        letters = await self._store.list_dead_letters(_station(request.station))
        return deadletters_pb2.ListDeadLettersResponse(success=True, dead_letters=[letter_message(d) for d in letters])

    async def ResendDeadLetters(
        self, request: deadletters_pb2.ResendDeadLettersRequest, ctx: CallContext
    ) -> deadletters_pb2.ResendDeadLettersResponse:
        ctx.require_principal()
        station = _station(request.station)
        if not request.ids:
            raise InvalidArgument("ids is required: the dead letters to resend (GET /stations/{station}/dls)")
        if len(request.ids) > MAX_RESEND_IDS:
            raise InvalidArgument(f"too many ids: at most {MAX_RESEND_IDS} per call")
        resent, missing = await self._store.resend_dead_letters(station, list(dict.fromkeys(request.ids)))
        return deadletters_pb2.ResendDeadLettersResponse(success=True, resent=resent, missing=missing)

    async def PurgeDeadLetters(
        self, request: deadletters_pb2.PurgeDeadLettersRequest, ctx: CallContext
    ) -> deadletters_pb2.PurgeDeadLettersResponse:
        ctx.require_principal()
        await self._store.purge_dead_letters(_station(request.station))
        return deadletters_pb2.PurgeDeadLettersResponse(success=True)
