"""The seam between the servicers and the message broker.

The servicers see only :class:`Broker`; ``gateway.broker.adapter`` implements
it over memphis-py (and its JetStream connection); unit tests may use a fake.
Errors are raised as ``gateway.core.errors`` types: Unauthenticated for refused
credentials, Unavailable when the broker cannot be reached, InvalidArgument for
a message the station refuses (schema).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.core.headers import EMPTY, MessageHeaders
from gateway.core.identity import Credentials


@dataclass(frozen=True, slots=True, kw_only=True)
class OutMessage:
    """A message to produce."""

    data: bytes
    headers: MessageHeaders = EMPTY  # validated; a batch's messages share one
    json: bool = False  # data is JSON text (application/json): a protobuf-schema station converts it


@dataclass(frozen=True, slots=True, kw_only=True)
class InMessage:
    """A consumed message; ack_id is set when the client must acknowledge it."""

    data: bytes
    headers: dict[str, str]
    ack_id: str | None = None
    # set when the ConsumerSpec asked for metadata (0: unknown)
    sequence: int = 0  # stream sequence in its partition
    partition: int = 0  # 1..N (0: a station without partitions)
    timestamp_ns: int = 0  # when the broker stored it, ns since the epoch
    deliveries: int = 0  # this delivery included
    # set when the ConsumerSpec asked to decode: the message as a JSON value (data is then empty), or why not
    decoded: Any = None  # a google.protobuf.Value
    decode_error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerSpec:
    station: str
    consumer_name: str
    group: str  # the broker-side consumer group name
    explicit_ack: bool = False
    max_bytes: int = 0  # hand out at most about this many bytes per batch (0: no limit); the rest waits
    include_metadata: bool = False  # fill InMessage's sequence, partition, timestamp_ns, deliveries
    decode: bool = False  # fill InMessage's decoded (or decode_error) by the station's schema
    # the group's settings when this call creates it (None: memphis-py's default)
    max_msg_deliveries: int | None = None
    max_ack_time_ms: int | None = None
    start_consume_from_sequence: int | None = None
    last_messages: int | None = None


class Broker(Protocol):
    async def open_session(self, creds: Credentials) -> Credentials:
        """Connect as this user (proving the credentials) and keep the connection; answer the
        credentials as the broker accepted them (tokens name that identity)."""

    async def produce(
        self, creds: Credentials, station: str, messages: Sequence[OutMessage], producer_name: str = ""
    ) -> list[str | None]:
        """Produce with all messages in flight; one error text (or None) per message, in order.

        ``producer_name`` (default "rest-gateway") is the producer Memphis lists and the messages name.

        Returns only once the broker stored every message that has no error."""

    async def fetch(
        self, creds: Credentials, spec: ConsumerSpec, batch_size: int, max_wait_s: float
    ) -> list[InMessage]:
        """Up to batch_size messages; early once batch_size are there, else after max_wait_s."""

    def subscribe(self, creds: Credentials, spec: ConsumerSpec, batch_size: int) -> AsyncIterator[list[InMessage]]:
        """Batches of messages until the caller stops iterating."""

    def events(
        self, creds: Credentials, spec: ConsumerSpec, resume: dict[int, int] | None
    ) -> AsyncIterator[tuple[dict[int, int], InMessage | None]]:
        """(cursor, message) pairs for an event stream, resumable from a cursor (``gateway.broker.events``).

        The first pair carries no message: the cursor the stream starts at."""

    async def ack(self, creds: Credentials, station: str, ack_ids: Sequence[str], nack: bool) -> int:
        """Acknowledge (or nack) messages handed out in explicit mode; returns how many were valid."""

    async def health(self) -> str | None:
        """None when the broker answers, else why not."""

    async def storage_bytes(self, creds: Credentials) -> int: ...

    async def close(self) -> None: ...
