"""Produce: a user's route into a station, schema checks, and pipelined publishing.

The SDK creates the producer through Memphis's control plane (so SDK clients and the
gateway see the same stations); the publishes then go straight to the subjects memphis-py
itself would use (docs/memphis-py.md, "Names"), all of a batch in flight at once
(``gateway.broker.publisher``), each answered only once the broker stored it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import nats.errors

from gateway.broker.natsutil import DOWN, RETRY_AFTER_S
from gateway.broker.publisher import Publisher, encode_headers, header_lines
from gateway.broker.routes import ConnectionLost, Route
from gateway.broker.sdk import SCHEMAVERSE_DLS, protobuf_payload, refusal_report, sdk_call, validated
from gateway.broker.seam import OutMessage
from gateway.broker.sessions import Session, SessionPool
from gateway.core.budget import Budget
from gateway.core.errors import InvalidArgument, Unavailable
from gateway.core.identity import Credentials
from gateway.core.names import FINAL, internal_name, stream_name

log = logging.getLogger("gateway.broker")
PRODUCER_NAME = "rest-gateway"
LOST_IN_FLIGHT = (
    "broker unavailable: the connection to the broker was lost before it acknowledged; "
    "the message may or may not be stored (retry with an idempotency key)"
)


# What a message awaiting its acknowledgement holds besides its bytes (about 600 B of RSS measured). The
# bodies of REST requests are bounded by the transcoder, but a body of 15 KB is 5,000 messages of ``{}``
# and gRPC has no such bound: without a budget, concurrent batches held about 3 MB each meanwhile.
MESSAGE_OVERHEAD = 512


class Producing:
    """The produce half of :class:`gateway.broker.adapter.MemphisBroker`."""

    def __init__(self, pool: SessionPool, timeout_s: float, budget: Budget) -> None:
        self._pool = pool
        self._timeout = timeout_s
        self._budget = budget

    async def produce(
        self, creds: Credentials, station: str, messages: Sequence[OutMessage], producer_name: str = ""
    ) -> list[str | None]:
        session = self._pool.ready(creds) or await self._pool.get(creds)
        session.in_use += 1
        try:
            key = internal_name(station)
            producer = producer_name or PRODUCER_NAME
            route_key = key if producer == PRODUCER_NAME else f"{key}/{producer}"  # one route per producer
            route = session.routes.get(route_key) or await self._route(session, station, key, route_key, producer)
            return await self._publish_all(session, route, station, key, messages)
        finally:
            session.in_use -= 1
            session.last_used = time.monotonic()

    async def _route(self, session: Session, station: str, key: str, route_key: str, name: str) -> Route:
        return await session.once(session.routes, route_key, lambda: self._new_route(session, station, key, name))

    async def _new_route(self, session: Session, station: str, key: str, name: str) -> Route:
        m = session.memphis
        producer = await sdk_call(m.producer(station_name=station, producer_name=name, timeout_retries=0),
                                  self._timeout)
        partitions = m.partition_producers_updates_data.get(key, {}).get("partitions_list") or []
        streams = {p: stream_name(station, p) for p in partitions} or {0: key}  # no partitions: legacy layout
        functions = m.functions_updates_data.get(key, {})
        subjects = {
            p: f"{stream}.functions.{functions[str(p)]}" if str(p) in functions else f"{stream}.{FINAL}"
            for p, stream in streams.items()
        }
        # the headers memphis-py adds to every message, encoded once
        base = header_lines({"$memphis_producedBy": name, "$memphis_connectionId": m.connection_id or ""})
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
        schema = self._schema(session, route, station, key)
        protobuf = schema is not None and schema.get("type") == "protobuf"
        refused: list[int] = []
        cost = 0  # each message's bytes + MESSAGE_OVERHEAD, held in the budget until acknowledged
        for i, message in enumerate(messages):
            payload = message.data
            if schema is not None:
                try:
                    if protobuf:  # JSON converted (protobuf-native producers), bytes checked
                        payload = protobuf_payload(session.memphis, key, payload, message.json)
                    else:
                        payload = bytes(await validated(session.memphis, station, payload))
                except InvalidArgument as exc:
                    errors[i] = exc.message
                    refused.append(i)
                    continue
            headers = message.headers
            block = blocks.get(id(headers)) or blocks.setdefault(
                id(headers), encode_headers(headers, route.base_headers))
            subject = route.only_subject or route.subjects[self._partition(route, message)]
            items.append((subject, block, payload))
            positions.append(i)
            cost += len(block) + len(payload)
        if refused and session.memphis.station_schemaverse_to_dls.get(key):
            await self._report_refusals(session, route, key, [(messages[i], errors[i] or "") for i in refused])
        if not items:
            return errors
        if session.publisher is None:
            session.publisher = Publisher(session.nc)
        cost += MESSAGE_OVERHEAD * len(items)
        self._budget.take(cost)
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
        finally:
            self._budget.give(cost)
        for i, error in zip(positions, results, strict=True):
            if error is not None:
                if error.retryable:  # the client retries the whole call (idempotency keys make that safe)
                    if session.routes.get(key) is route:  # the station may be gone or re-made: a new route next
                        session.routes.pop(key, None)
                    raise Unavailable(f"broker unavailable: {error.text}", retry_after=RETRY_AFTER_S)
                errors[i] = error.text
        return errors

    @staticmethod
    async def _report_refusals(
        session: Session, route: Route, key: str, refusals: list[tuple[OutMessage, str]]
    ) -> None:
        """Schema refusals to the station's dead letters (its dls.schemaverse is on), as memphis-py
        reports its own. Best effort, never waited for: the caller has its 400 either way. Bounded
        by the connection's write buffer (a flood beyond it, or a report beyond the broker's
        max_payload, is not stored; one log line per call) and by the store's limits."""
        name = str(getattr(route.producer, "producer_name", "") or PRODUCER_NAME)
        for message, error in refusals:
            report = refusal_report(session.memphis, key, name, message.data, message.headers.items, error)
            try:
                await session.nc.publish(SCHEMAVERSE_DLS, report)
            except (nats.errors.Error, OSError) as exc:
                log.info("schema refusals of station %s not sent to its dead letters: %s", key,
                         type(exc).__name__)
                return

    def _partition(self, route: Route, message: OutMessage) -> int:
        if message.headers.partition_key:
            return int(route.producer.get_partition_from_key(message.headers.partition_key))
        return next(route.rr)

    @staticmethod
    def _schema(session: Session, route: Route, station: str, key: str) -> Any:
        """The station's schema (None without one); validators rebuilt when its push changed it.

        memphis-py does not rebuild them itself (docs/memphis-py.md B6)."""
        m = session.memphis
        schema = m.schema_updates_data.get(key) or None
        if schema is not None and schema is not route.schema_seen:
            m.update_schema_data(station)
            route.schema_seen = schema
        return schema
