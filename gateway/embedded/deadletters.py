"""The dead-letter store: messages a station could not deliver or refused, kept per station.

Two sources, both heard by the control plane (a queue subscription: one replica stores each):

* **poison messages**: JetStream's advisory ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<durable>``
  when a consumer group's durable gave up on a message (delivered, or nacked, max_msg_deliveries
  times); the message is read back from its partition stream by sequence;
* **schema refusals**: what memphis-py publishes on ``$memphis_schemaverse_dls`` when its client-side
  validation refused a message (docs/memphis-py.md, "$memphis_schemaverse_dls"), and what the
  gateway's own producers publish there in the same form (``gateway.broker.produce``).

Either is stored when the station's ``dls`` setting for it is on, as one message of the JetStream
stream ``memgw-dls`` on subject ``memgw-dls.<internal station name>``: the original payload and
headers plus ``Memgw-Dls-*`` headers (reason, group, deliveries, partition, sequence, error). The
dead letter's id is its sequence in that stream. The stream keeps at most ``MAX_PER_STATION``
dead letters per station and ``MAX_STORE_BYTES`` in all (the oldest go first), and refusal reports
waiting to be stored are bounded by ``MAX_PENDING_BYTES`` (beyond: dropped by the client library).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from gateway.core.errors import NotFound, Unavailable
from gateway.core.headers import one_line, storable
from gateway.core.names import internal_name, produce_subject
from gateway.embedded.catalog import Catalog
from gateway.embedded.records import broker_errors

log = logging.getLogger("gateway.controlplane")

STREAM = "memgw-dls"
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"
SCHEMAVERSE_DLS = "$memphis_schemaverse_dls"
MAX_LISTED = 1000
MAX_AGE_S = 7 * 24 * 3600.0  # a week, as Memphis keeps dead letters
# Bounds against a flood of poison messages or schema refusals (the oldest go first):
MAX_PER_STATION = 10_000  # dead letters kept per station
MAX_STORE_BYTES = 1024 * 1024 * 1024  # the whole store
MAX_PENDING_BYTES = 16 * 1024 * 1024  # refusal reports waiting to be stored (beyond: dropped, slow consumer)
H = "Memgw-Dls-"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    id: int
    reason: str  # "poison" or "schema"
    data: bytes
    headers: dict[str, str]
    group: str = ""
    deliveries: int = 0
    partition: int = 0
    sequence: int = 0
    error: str = ""
    stored_at: float = 0.0  # seconds since the epoch
    extra: dict[str, str] = field(default_factory=dict)


def _subject(station: str) -> str:
    return f"{STREAM}.{internal_name(station)}"


class DeadLetters:
    def __init__(self, catalog: Catalog, *, queue: str, replicas: int = 1) -> None:
        self._catalog = catalog
        self._queue = queue
        self._replicas = replicas
        self._nc: Client | None = None
        self._subs: list[Subscription] = []
        self._may_report: Callable[[Msg, str], bool] = lambda _msg, _station: True

    @property
    def _js(self) -> JetStreamContext:
        if self._nc is None:
            raise Unavailable("control plane not started")
        return self._nc.jetstream()

    async def open(self, nc: Client, reports: Client | None = None,
                   may_report: Callable[[Msg, str], bool] | None = None) -> None:
        """Open the store on ``nc``; schema refusals are heard on ``reports`` (default ``nc``: with the
        embedded broker the control plane's own connection, which the reports reach through a service
        import naming their sender) and stored only if ``may_report(msg, station)``."""
        self._nc = nc
        if may_report is not None:
            self._may_report = may_report
        with broker_errors():
            config = api.StreamConfig(name=STREAM, subjects=[f"{STREAM}.>"], max_age=MAX_AGE_S,
                                      max_msgs_per_subject=MAX_PER_STATION, max_bytes=MAX_STORE_BYTES,
                                      discard=api.DiscardPolicy.OLD, num_replicas=self._replicas,
                                      storage=api.StorageType.FILE)
            try:
                info = await self._js.stream_info(STREAM)
            except NotFoundError:
                await self._js.add_stream(config)
            else:  # a store made before the bounds: given them
                if (info.config.max_msgs_per_subject, info.config.max_bytes) != (MAX_PER_STATION, MAX_STORE_BYTES):
                    info.config.max_msgs_per_subject, info.config.max_bytes = MAX_PER_STATION, MAX_STORE_BYTES
                    await self._js.update_stream(info.config)
            self._subs = [await nc.subscribe(ADVISORY, queue=self._queue, cb=self._on_advisory),
                          await (reports or nc).subscribe(SCHEMAVERSE_DLS, queue=self._queue,
                                                          cb=self._on_schema_refusal,
                                                          pending_bytes_limit=MAX_PENDING_BYTES)]

    async def close(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            event = json.loads(msg.data)
            stream, durable = str(event["stream"]), str(event["consumer"])
            seq, deliveries = int(event["stream_seq"]), int(event.get("deliveries", 0))
            internal, _, partition = stream.rpartition("$")
            if not internal or not partition.isdigit():
                return  # not a station's partition stream
            info = await self._catalog.station_info(internal.replace("#", "."))
            if info is None or not info.spec.poison_to_dls:
                return
            original = await self._js.get_msg(stream, seq)
            headers = {k: v for k, v in (original.headers or {}).items() if not k.lower().startswith(H.lower())}
            await self._store(info.name, original.data or b"", headers, {
                "Reason": "poison", "Group": durable, "Deliveries": str(deliveries),
                "Partition": partition, "Sequence": str(seq)})
        except Exception as err:  # a lost dead letter must not kill the subscription
            log.warning("dead letter from advisory %s not stored: %s", msg.subject, err)

    async def _on_schema_refusal(self, msg: Msg) -> None:
        try:
            event = json.loads(msg.data)
            station = str(event["station_name"])
            info = await self._catalog.station_info(station)
            if info is None or not info.spec.schemaverse_to_dls or not self._may_report(msg, info.name):
                return
            message = event.get("message") or {}
            data = bytes.fromhex(str(message.get("data", "")))
            headers = _reported_headers(message.get("headers"))
            producer = (event.get("producer") or {}).get("name", "")
            await self._store(info.name, data, headers, {
                "Reason": "schema", "Error": one_line(str(event.get("validation_error", ""))[:1000]),
                "Producer": one_line(str(producer)[:200])})
        except Exception as err:
            log.warning("dead letter from %s not stored: %s", msg.subject, err)

    async def _store(self, station: str, data: bytes, headers: dict[str, str], extra: dict[str, str]) -> None:
        all_headers = headers | {H + k: v for k, v in extra.items() if v} | {H + "Time": f"{time.time():.3f}"}
        await self._js.publish(_subject(station), data, headers=all_headers)
        log.info("dead letter stored for station %s (%s)", station, extra.get("Reason"))

    async def _station(self, station: str) -> str:
        info = await self._catalog.station_info(station)
        if info is None:
            raise NotFound(f"Station {station} does not exist")
        return info.name

    async def letters(self, station: str) -> list[DeadLetter]:
        """The station's dead letters, oldest first (at most ``MAX_LISTED``)."""
        subject = _subject(await self._station(station))
        letters: list[DeadLetter] = []
        seq = 1
        with broker_errors():
            while len(letters) < MAX_LISTED:
                try:
                    raw = await self._js.get_msg(STREAM, seq, subject=subject, next=True)
                except NotFoundError:
                    break
                letters.append(_letter(raw))
                seq = int(raw.seq or 0) + 1
        return letters

    async def resend(self, station: str, ids: list[int]) -> tuple[int, list[int]]:
        """Publish the dead letters back to the station (their partition), then drop them.

        Answers (resent, the ids that are no dead letters of this station)."""
        name = await self._station(station)
        subject = _subject(name)
        info = await self._catalog.station_info(name)
        partitions = info.partitions if info is not None else [1]
        resent, missing = 0, []
        with broker_errors():
            for dl_id in ids:
                try:
                    raw = await self._js.get_msg(STREAM, dl_id)
                except NotFoundError:
                    missing.append(dl_id)
                    continue
                if raw.subject != subject:
                    missing.append(dl_id)
                    continue
                letter = _letter(raw)
                partition = letter.partition if letter.partition in partitions else partitions[0]
                await self._js.publish(produce_subject(name, partition), letter.data, headers=letter.headers or None)
                await self._js.delete_msg(STREAM, dl_id)
                resent += 1
        return resent, missing

    async def purge(self, station: str) -> None:
        subject = _subject(await self._station(station))
        with broker_errors():
            await self._js.purge_stream(STREAM, subject=subject)


def _reported_headers(reported: object) -> dict[str, str]:
    """A refusal report's headers that may be stored: any client may publish a report, so none that
    would pose as the store's own (``Memgw-Dls-*``) or the broker's, or add header lines of its own."""
    if not isinstance(reported, dict):
        return {}
    headers = {str(k): str(v) for k, v in reported.items()}
    return {k: v for k, v in headers.items() if storable(k, v) and not k.lower().startswith(H.lower())}


def _letter(raw: api.RawStreamMsg) -> DeadLetter:
    all_headers = dict(raw.headers or {})
    extra = {k[len(H):]: v for k, v in all_headers.items() if k.startswith(H)}
    headers = {k: v for k, v in all_headers.items() if not k.startswith(H)}

    def num(key: str) -> int:
        value = extra.get(key, "0")
        return int(value) if value.isdigit() else 0

    try:
        stored_at = float(extra.get("Time", "0"))
    except ValueError:
        stored_at = 0.0
    return DeadLetter(
        id=int(raw.seq or 0), reason=extra.get("Reason", ""), data=raw.data or b"", headers=headers,
        group=extra.get("Group", ""), deliveries=num("Deliveries"), partition=num("Partition"),
        sequence=num("Sequence"), error=extra.get("Error", ""), stored_at=stored_at,
        extra={k: v for k, v in extra.items() if k == "Producer"},
    )
