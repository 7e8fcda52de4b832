"""What a session keeps per station: the route its produces take, and its consumer groups."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any


class ConnectionLost(Exception):
    """Set on the publishes in flight when their connection drops."""


@dataclass(slots=True, kw_only=True)
class Route:
    """Where one user's produce into one station goes."""

    producer: Any  # memphis.Producer
    subjects: dict[int, str]
    rr: itertools.cycle[int]
    schema_seen: Any = None  # the schema_updates_data entry the validator was built from
    base_headers: bytes = b""  # the header lines memphis-py adds to every message, encoded
    only_subject: str = ""  # the subject when the station has one partition


@dataclass(slots=True, kw_only=True)
class Group:
    consumer: Any  # memphis.Consumer
    subscriptions: list[Any]  # nats-py pull subscriptions, one per partition
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_partition: int = 0
    # fetched, unacknowledged, not yet handed out: (time fetched, message), oldest first
    carry: list[tuple[float, Any]] = field(default_factory=list)
