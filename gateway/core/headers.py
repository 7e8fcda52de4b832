"""Message headers: the one place that decides what a message may carry.

Both protocols hand the servicers plain maps (REST: the request's headers; gRPC: the
``headers`` fields). :func:`message_headers` turns them, once, into a
:class:`MessageHeaders` value that later layers trust: the publisher encodes it as it is.

Rules:

* dropped: credentials and transport headers (``Authorization``, ``Cookie``, hop-by-hop,
  ``Content-Length``, ``Host``);
* refused (InvalidArgument): names starting with ``$memphis`` (the SDK's own), names
  the broker reads as control headers (``Status``, ``Description``, every ``Nats-*``, also
  ``Nats-Msg-Id``, which would bypass the gateway's own idempotency key: a stored
  ``Status: 503`` makes nats-py read the message as a JetStream status frame), names that are
  not HTTP tokens (RFC 9110: visible ASCII without separators; no NUL, no space, no non-ASCII),
  values holding CR, LF or NUL;
* keys: ``Idempotency-Key`` (kept as a header) and ``msg-id`` (memphis-py's name; taken as the
  key, not stored as it is) give :attr:`MessageHeaders.idempotency_key`;
  ``Partition-Key`` gives :attr:`MessageHeaders.partition_key`. Explicit keys (request
  fields, query parameters) win over headers and are checked the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from gateway.core.errors import InvalidArgument

RESERVED_PREFIX = "$memphis"
# Never message headers, whoever sends them (credentials and transport headers).
DROPPED = frozenset(
    h.lower()
    for h in (
        "Authorization", "Cookie", "Proxy-Authorization", "Connection", "Keep-Alive", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Proxy-Connection", "Content-Length", "Host",
    )
)
IDEMPOTENCY_KEY = "idempotency-key"


@lru_cache(maxsize=1024)
def canonical(name: str) -> str:
    """An HTTP header name as the upstream stores it (fasthttp's normalizeHeaderKey): the first letter
    and every letter after ``-`` upper-case, the others lower-case (``x-example-id`` -> ``X-Example-Id``).

    Like fasthttp, a name holding a space or a character outside visible ASCII is left as it is.
    REST request headers only: gRPC's ``headers`` map is stored as the caller spelled it."""
    if not name.isascii() or any(c <= " " or c == "\x7f" for c in name):
        return name
    out, upper = [], True
    for c in name:
        out.append(c.upper() if upper else c.lower())
        upper = c == "-"
    return "".join(out)
IDEMPOTENCY_ALIASES = frozenset({"msg-id"})  # taken as the key, not stored
PARTITION_KEY = "partition-key"
BROKER_RESERVED = frozenset({"status", "description"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_CHARS = frozenset("\r\n\0")

# what a header name is for: kept, dropped or a key that is not stored
_KEEP, _DROP, _ALIAS = 0, 1, 2


@dataclass(frozen=True, slots=True)
class MessageHeaders:
    """Validated headers of a message, and the keys the publisher turns into broker headers."""

    items: Mapping[str, str] = field(default_factory=dict)  # stored with the message, in order
    idempotency_key: str = ""
    partition_key: str = ""


EMPTY = MessageHeaders()


@lru_cache(maxsize=4096)
def _kind(key: str) -> int:
    """What a header of this name becomes; InvalidArgument if no message may carry it (cached)."""
    lower = key.lower()
    if lower in DROPPED:
        return _DROP
    if lower.startswith(RESERVED_PREFIX):
        raise InvalidArgument(f"header {key!r}: names starting with $memphis are reserved by Memphis")
    if lower in IDEMPOTENCY_ALIASES:
        return _ALIAS
    if lower in BROKER_RESERVED or lower.startswith("nats-"):
        raise InvalidArgument(
            f"header {key!r}: reserved by the broker (Status, Description and Nats-* headers control JetStream); "
            "rename it (for idempotency use Idempotency-Key)"
        )
    if not _TOKEN.fullmatch(key):
        raise InvalidArgument(
            f"header {key.encode('ascii', 'backslashreplace').decode()!r}: a name must be visible ASCII "
            "letters, digits and !#$%&'*+-.^_`|~ (no spaces, ':', NUL or non-ASCII)"
        )
    return _KEEP


def storable(name: str, value: str) -> bool:
    """Whether a header reported by a peer (a dead letter's original headers, read from a refusal report
    any client may publish) may be stored as it is: a token name that is no broker header (Nats-*,
    Status, Description: they control JetStream) and a value without CR, LF or NUL (they would add
    header lines of their own)."""
    lower = name.lower()
    return (bool(_TOKEN.fullmatch(name)) and not lower.startswith("nats-") and lower not in BROKER_RESERVED
            and _BAD_VALUE_CHARS.isdisjoint(value))


def one_line(value: str) -> str:
    """``value`` fit for a header we set ourselves: CR, LF and NUL as spaces."""
    return value.translate(_ONE_LINE) if not _BAD_VALUE_CHARS.isdisjoint(value) else value


_ONE_LINE = str.maketrans("\r\n\0", "   ")


def check_value(name: str, value: str) -> str:
    """``value`` if a header (or key) may hold it, else InvalidArgument."""
    if not _BAD_VALUE_CHARS.isdisjoint(value):
        raise InvalidArgument(f"{name}: values may not hold CR, LF or NUL")
    return value


def message_headers(
    *sources: Mapping[str, str], idempotency_key: str = "", partition_key: str = ""
) -> MessageHeaders:
    """Merge header maps (later ones win) into one validated :class:`MessageHeaders`."""
    items: dict[str, str] = {}
    header_key = ""
    header_partition = ""
    for source in sources:
        for key in source:  # not .items(): a protobuf map's is a slow Python-level view
            kind = _kind(key)
            if kind == _DROP:
                continue
            value = source[key]
            if not _BAD_VALUE_CHARS.isdisjoint(value):
                check_value(f"header {key!r}", value)  # raises, naming the header
            if kind == _ALIAS:
                header_key = header_key or value
                continue
            lower = key.lower()
            if lower == IDEMPOTENCY_KEY:
                header_key = value
            elif lower == PARTITION_KEY:
                header_partition = header_partition or value
            items[key] = value
    if idempotency_key:
        check_value("idempotency_key", idempotency_key)
    if partition_key:
        check_value("partition_key", partition_key)
    return MessageHeaders(
        items=items,
        idempotency_key=idempotency_key or header_key,
        partition_key=partition_key or header_partition,
    )


def with_headers(base: MessageHeaders, extra: Mapping[str, str], idempotency_key: str = "",
                 partition_key: str = "") -> MessageHeaders:
    """``base`` plus one message's own headers and keys (a gRPC batch: shared, then per message)."""
    if not extra and not idempotency_key and not partition_key:
        return base
    own = message_headers(extra, idempotency_key=idempotency_key, partition_key=partition_key)
    return MessageHeaders(
        items={**base.items, **own.items} if own.items else base.items,
        idempotency_key=own.idempotency_key or base.idempotency_key,
        partition_key=own.partition_key or base.partition_key,
    )
