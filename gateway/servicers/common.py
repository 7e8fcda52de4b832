"""Request checks shared by the servicers: station names and message headers."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from gateway.errors import InvalidArgument
from gateway.names import validate_name

RESERVED_HEADER_PREFIX = "$memphis"
# Never message headers, whoever sends them (credentials and transport headers).
DROPPED_HEADERS = frozenset(
    h.lower()
    for h in (
        "Authorization", "Cookie", "Proxy-Authorization", "Connection", "Keep-Alive", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Proxy-Connection", "Content-Length", "Host",
    )
)


@lru_cache(maxsize=4096)
def station_name(raw: str) -> str:
    """The station's (lower-cased) name, or InvalidArgument saying why it is not valid (valid names are cached)."""
    reason = validate_name(raw, "station")
    if reason is not None:
        raise InvalidArgument(f"invalid station name: {reason}")
    return raw.lower()


_BAD_KEY_CHARS = frozenset("\r\n: \t")
_BAD_VALUE_CHARS = frozenset("\r\n\0")


@lru_cache(maxsize=1024)
def _kept(key: str) -> bool:
    """Whether a header of this name becomes a message header; InvalidArgument if no header may have it."""
    lower = key.lower()
    if lower in DROPPED_HEADERS:
        return False
    if lower.startswith(RESERVED_HEADER_PREFIX):
        raise InvalidArgument(f"header {key!r}: keys starting with $memphis are reserved")
    if not key or not _BAD_KEY_CHARS.isdisjoint(key):
        raise InvalidArgument(f"header {key!r}: names may not be empty or hold ':', spaces, CR or LF")
    return True


def message_headers(*sources: Mapping[str, str]) -> dict[str, str]:
    """Merge header maps into message headers, refusing reserved keys and CR/LF."""
    merged: dict[str, str] = {}
    for source in sources:
        for key in source:  # not .items(): a protobuf map's is a slow Python-level view
            value = source[key]
            if not _kept(key):
                continue
            if not _BAD_VALUE_CHARS.isdisjoint(value):
                raise InvalidArgument(f"header {key!r}: values may not hold CR, LF or NUL")
            merged[key] = value
    return merged


def header_lookup(*names: str) -> frozenset[str]:
    """A set of lower-cased header names, built once."""
    return frozenset(n.lower() for n in names)
