"""Memphis station, consumer-group and schema settings, and the JetStream configs they become.

Value objects shared by the control plane (``gateway.embedded.catalog``, ``gateway.embedded.controlplane``)
and the gateway: ``StationSpec`` and ``GroupSpec`` carry what the SDK's creation requests
carry, with the Memphis server's defaults and clamps (docs/memphis-py.md, "Names"); ``StationInfo`` and
``SchemaInfo`` are what the catalog answers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import grpc
from nats.js import api

from gateway.core.errors import GatewayError, InvalidArgument
from gateway.core.names import FINAL, internal_name, produce_subject, stream_name, validate_name

RETENTION_TYPES = ("message_age_sec", "messages", "bytes", "ack_based")
STORAGE_TYPES = ("file", "memory")
MAX_PARTITIONS = 10_000
MIN_IDEMPOTENCY_MS, MAX_IDEMPOTENCY_MS, DEFAULT_IDEMPOTENCY_MS = 100, 24 * 3600 * 1000, 120_000


class AlreadyExists(GatewayError):
    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True, slots=True, kw_only=True)
class StationSpec:
    """A station's configuration, as ``$memphis_station_creations`` carries it."""

    name: str
    retention_type: str = "message_age_sec"
    retention_value: int = 3600
    storage_type: str = "file"
    replicas: int = 1
    idempotency_window_ms: int = DEFAULT_IDEMPOTENCY_MS
    partitions_number: int = 1
    schema_name: str = ""
    schemaverse_to_dls: bool = True
    poison_to_dls: bool = True
    dls_station: str = ""
    tiered_storage_enabled: bool = False
    created_by: str = ""

    def normalized(self) -> StationSpec:
        """Validated, with the Memphis server's defaults and clamps applied."""
        for kind, value in (("station", self.name), ("schema", self.schema_name or "x")):
            if reason := validate_name(value, kind):
                raise InvalidArgument(reason)
        if self.retention_type not in RETENTION_TYPES:
            raise InvalidArgument(f"retention type can be one of the following: {', '.join(RETENTION_TYPES)}")
        if self.storage_type not in STORAGE_TYPES:
            raise InvalidArgument(f"storage type can be one of the following: {', '.join(STORAGE_TYPES)}")
        if not 1 <= self.partitions_number <= MAX_PARTITIONS:
            raise InvalidArgument(f"partitions number should be between 1 and {MAX_PARTITIONS}")
        window = self.idempotency_window_ms if self.idempotency_window_ms > 0 else DEFAULT_IDEMPOTENCY_MS
        window = min(max(window, MIN_IDEMPOTENCY_MS), MAX_IDEMPOTENCY_MS)
        if self.retention_type == "message_age_sec" and self.retention_value > 0:
            window = min(window, self.retention_value * 1000)
        return replace(self, name=self.name.lower(), replicas=max(1, self.replicas), idempotency_window_ms=window)

    def stream_config(self, partition: int) -> api.StreamConfig:
        stream = stream_name(self.name, partition)
        value, kind = self.retention_value, self.retention_type
        return api.StreamConfig(
            name=stream,
            subjects=[f"{stream}.>"],
            retention=api.RetentionPolicy.INTEREST if kind == "ack_based" else api.RetentionPolicy.LIMITS,
            max_age=float(value) if kind == "message_age_sec" and value > 0 else 0.0,
            max_msgs=value if kind == "messages" and value > 0 else -1,
            max_bytes=value if kind == "bytes" and value > 0 else -1,
            discard=api.DiscardPolicy.OLD,
            storage=api.StorageType.MEMORY if self.storage_type == "memory" else api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.idempotency_window_ms / 1000,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaInfo:
    """The active version of a schema."""

    name: str
    type: str
    version_number: int
    content: str
    descriptor: str = ""  # base64 FileDescriptorSet, protobuf only
    message_struct_name: str = ""

    def schema_update(self) -> dict[str, Any]:
        """The ``schema_update`` object of the SDK replies and pushes."""
        return {
            "schema_name": self.name,
            "type": self.type,
            "active_version": {
                "version_number": self.version_number,
                "descriptor": self.descriptor,
                "schema_content": self.content,
                "message_struct_name": self.message_struct_name,
            },
        }


def no_schema_update() -> dict[str, Any]:
    """The ``schema_update`` object meaning "no schema" (an empty ``schema_name``)."""
    return SchemaInfo(name="", type="", version_number=0, content="").schema_update()


@dataclass(frozen=True, slots=True, kw_only=True)
class StationInfo:
    """A station as the catalog knows it: partitions 1..N, the active schema if any."""

    name: str
    internal_name: str
    partitions: list[int]
    schema: SchemaInfo | None
    spec: StationSpec

    @property
    def schema_update(self) -> dict[str, Any]:
        return self.schema.schema_update() if self.schema else no_schema_update()

    def stream(self, partition: int) -> str:
        """The JetStream stream of ``partition``."""
        return stream_name(self.name, partition)

    def subject(self, partition: int) -> str:
        """The subject producers publish ``partition``'s messages on (no station functions)."""
        return produce_subject(self.name, partition)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """A consumer group's durable settings, as ``$memphis_consumer_creations`` carries them.

    Defaults are memphis-py's; out-of-range values get the Memphis server's clamps.
    """

    name: str
    max_ack_time_ms: int = 30_000
    max_msg_deliveries: int = 2
    start_consume_from_sequence: int = 1
    last_messages: int = -1

    def consumer_config(self, stream: str, last_seq: int) -> api.ConsumerConfig:
        policy, start = api.DeliverPolicy.ALL, None
        if self.last_messages == 0 and self.start_consume_from_sequence == 1:
            policy = api.DeliverPolicy.NEW
        elif self.last_messages > 0:
            policy, start = api.DeliverPolicy.BY_START_SEQUENCE, max(1, last_seq - self.last_messages + 1)
        elif self.start_consume_from_sequence > 1:
            policy, start = api.DeliverPolicy.BY_START_SEQUENCE, self.start_consume_from_sequence
        return api.ConsumerConfig(
            durable_name=internal_name(self.name),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=(self.max_ack_time_ms if self.max_ack_time_ms > 0 else 30_000) / 1000,
            max_deliver=self.max_msg_deliveries if 1 <= self.max_msg_deliveries <= 10 else 10,
            replay_policy=api.ReplayPolicy.INSTANT,
            max_ack_pending=-1,
            deliver_policy=policy,
            opt_start_seq=start,
            filter_subject=f"{stream}.{FINAL}",
        )
