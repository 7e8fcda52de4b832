"""Memphis name rules: which names are valid, and how they map onto JetStream.

The rules are the Memphis server's (docs/memphis-py.md, "Names") and apply to stations, producers,
consumers, consumer groups and schemas alike:

* after lower-casing, only ``a-z``, ``0-9``, ``_``, ``.`` and ``-``;
* at most 128 characters, not empty;
* first and last character alphanumeric.

The *internal name* (``internal_name``) is what JetStream sees: the lower-cased name with
``.`` replaced by ``#``, since dots separate subject tokens. A station ``Orders.EU`` with
one partition is stored in the stream ``orders#eu$1`` and produced to on
``orders#eu$1.final``.
"""

from __future__ import annotations

import re
from functools import lru_cache

from gateway.core.errors import InvalidArgument

MAX_NAME_LENGTH = 128
FINAL = "final"  # the last subject token of a partition's messages (before station functions ran: none here)
_ALLOWED = re.compile(r"^[a-z0-9_.-]*$")


def internal_name(name: str) -> str:
    """The JetStream-safe form of a Memphis name, as memphis-py's ``get_internal_name``."""
    return name.lower().replace(".", "#")


def validate_name(name: object, kind: str = "station") -> str | None:
    """Return why ``name`` is not a valid Memphis name (``kind`` names it), or None if it is."""
    if not isinstance(name, str) or name == "":
        return f"{kind} name can not be empty"
    if not name.isascii():  # before lower(): "\u212a" (Kelvin sign) would become "k"
        return f"Only alphanumeric and the '_', '-', '.' characters are allowed in the {kind} name (ASCII only)"
    lowered = name.lower()
    if len(lowered) > MAX_NAME_LENGTH:
        return f"{kind} name should be under {MAX_NAME_LENGTH} characters"
    if not _ALLOWED.fullmatch(lowered):
        return f"Only alphanumeric and the '_', '-', '.' characters are allowed in the {kind} name"
    if not (lowered[0].isalnum() and lowered[-1].isalnum()):
        return f"{kind} name can not start or end with a non alphanumeric character"
    return None


@lru_cache(maxsize=4096)
def station_name(raw: str) -> str:
    """The station's (lower-cased) name, or InvalidArgument saying why it is not valid (valid names are cached)."""
    reason = validate_name(raw, "station")
    if reason is not None:
        raise InvalidArgument(f"invalid station name: {reason}")
    return raw.lower()


def stream_name(station: str, partition: int) -> str:
    """The JetStream stream of one partition of a station (station_version 2 layout)."""
    return f"{internal_name(station)}${partition}"


def produce_subject(station: str, partition: int) -> str:
    """The subject messages of ``partition`` are published on."""
    return f"{stream_name(station, partition)}.{FINAL}"
