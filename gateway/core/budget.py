"""A bound on bytes held at once across calls: what request bodies and unacknowledged messages hold."""

from __future__ import annotations

from gateway.core.errors import Unavailable

RETRY_AFTER_S = 1.0  # what a refused call is told to wait: calls in flight end within milliseconds


class Budget:
    """Bytes held at once, across all calls, bounded by ``limit``.

    ``take`` counts bytes from when a call holds them, ``give`` when it lets them go. A call that
    would take the total past the limit is refused at once (``Unavailable``, 503 / UNAVAILABLE with
    Retry-After) instead of waiting, so many calls at once cannot make the gateway hold more than
    ``limit`` bytes of them; except when nothing is held, so that one call larger than the limit
    still goes through alone. ``what`` names what is held, for the refusal's message."""

    __slots__ = ("held", "limit", "what")

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.held = 0

    def take(self, nbytes: int) -> None:
        if self.held and self.held + nbytes > self.limit:
            raise Unavailable(f"too many {self.what} (over {self.limit} bytes at once); retry shortly",
                              retry_after=RETRY_AFTER_S)
        self.held += nbytes

    def give(self, nbytes: int) -> None:
        self.held -= nbytes
