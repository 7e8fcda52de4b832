"""JSON text from orjson in a buffer of its own size.

orjson (3.12 and later) hands back its write buffer as the ``bytes`` object without shrinking it:
at least 4 KiB for any text, and for a container pre-reserved room per item (a 5,000-byte text held
65 KB, measured with orjson 3.13). That is harmless for text written once and dropped, but the
gateway holds JSON text for a while: each element of a REST batch until the broker acknowledged it
(5,000 elements of ``{}``, a 15 KB body, held 20 MB), and each answer until a slow client read it.
:func:`dumps` copies the text into a ``bytes`` of its length (about 0.1 us for a small one), so the
memory held follows the bytes a client sent or is sent."""

from __future__ import annotations

from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """``orjson.dumps(obj)``, in a buffer of its own size (TypeError as orjson raises it)."""
    return b"".join((orjson.dumps(obj), b""))  # join with an empty part: a copy of exactly the text
