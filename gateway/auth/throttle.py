"""Failed logins, throttled per client address and per user (password guessing costs time).

Authentication is public, so the per-user limits of :class:`gateway.auth.guard.Guard` never
see it. Each login attempt reserves one token from two buckets, the caller's address's and the
username's, *before* the broker is asked (so concurrent guesses cannot all slip through); a
successful login gives its tokens back, so only failures are charged. While either bucket is
empty, logins are refused with 429 and ``Retry-After``. The buckets refill continuously
(``per_min`` failures a minute, up to ``per_min`` in a row), so the real user, whose password
an attacker keeps guessing, waits at most ``60 / per_min`` seconds for an attempt: never a
lock-out.
"""

from __future__ import annotations

from gateway.auth.ratelimit import TokenBuckets
from gateway.core.errors import ResourceExhausted


def client_address(peer: str) -> str:
    """The address part of a peer: gRPC ``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678``, REST ``1.2.3.4``."""
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            rest = host
        return rest.strip("[]")
    return peer  # REST gives the bare address; unix sockets and the unknown ("") stay as they are


class LoginThrottle:
    """Token buckets of failed logins per address and per username; 0 failures a minute: off."""

    def __init__(self, per_user_per_min: float, per_address_per_min: float) -> None:
        self._users = TokenBuckets(per_user_per_min / 60, per_user_per_min) if per_user_per_min > 0 else None
        self._addresses = (
            TokenBuckets(per_address_per_min / 60, per_address_per_min) if per_address_per_min > 0 else None
        )

    def reserve(self, username: str, peer: str) -> tuple[str, str]:
        """Take one attempt from the user's and the address's buckets; ResourceExhausted (429) if
        either is empty (then nothing is taken). Give the keys back to :meth:`succeeded`."""
        address = client_address(peer)
        wait = self._users.take(username) if self._users is not None else 0.0
        if not wait and self._addresses is not None:
            wait = self._addresses.take(address)
            if wait and self._users is not None:
                self._users.give(username)
        if wait:
            raise ResourceExhausted(
                f"too many failed logins for this user or from this address; retry in {wait:.1f} s",
                retry_after=wait,
            )
        return username, address

    def succeeded(self, keys: tuple[str, str]) -> None:
        """The login succeeded: its attempt is not charged."""
        username, address = keys
        if self._users is not None:
            self._users.give(username)
        if self._addresses is not None:
            self._addresses.give(address)
