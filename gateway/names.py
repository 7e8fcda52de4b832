"""Memphis name rules: which names are valid, and how they map onto JetStream.

The rules are the Memphis server's (MEMPHIS.md §1.2) and apply to stations, producers,
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

MAX_NAME_LENGTH = 128
_ALLOWED = re.compile(r"^[a-z0-9_.-]*$")


def internal_name(name: str) -> str:
    """The JetStream-safe form of a Memphis name, as memphis-py's ``get_internal_name``."""
    return name.lower().replace(".", "#")


def validate_name(name: object, kind: str = "station") -> str | None:
    """Return why ``name`` is not a valid Memphis name (``kind`` names it), or None if it is."""
    if not isinstance(name, str) or name == "":
        return f"{kind} name can not be empty"
    lowered = name.lower()
    if len(lowered) > MAX_NAME_LENGTH:
        return f"{kind} name should be under {MAX_NAME_LENGTH} characters"
    if not _ALLOWED.fullmatch(lowered):
        return f"Only alphanumeric and the '_', '-', '.' characters are allowed in the {kind} name"
    if not (lowered[0].isalnum() and lowered[-1].isalnum()):
        return f"{kind} name can not start or end with a non alphanumeric character"
    return None


def stream_name(station: str, partition: int) -> str:
    """The JetStream stream of one partition of a station (station_version 2 layout)."""
    return f"{internal_name(station)}${partition}"


def produce_subject(station: str, partition: int) -> str:
    """The subject messages of ``partition`` are published on."""
    return f"{stream_name(station, partition)}.final"
