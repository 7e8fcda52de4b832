"""Who calls: a broker user's credentials, and the authenticated principal of a call.

One identity everywhere: :attr:`Credentials.identity` (``user$account``) keys the caller's
rate limits, stream quota and broker session alike, so a user is one user whatever else
differs between their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What the broker needs to let a user in; never logged, never in clear in a token."""

    username: str
    account_id: int
    password: str = field(default="", repr=False)
    connection_token: str = field(default="", repr=False)

    @property
    def identity(self) -> str:
        """The broker user this is (``<user>$<account id>``, as memphis-py names it on the wire)."""
        return f"{self.username}${self.account_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The authenticated caller of one call."""

    credentials: Credentials = field(repr=False)
    issued_at: float = 0.0  # when its token or API key was issued (revocation: tokens before a user's change)

    @property
    def username(self) -> str:
        return self.credentials.username

    @property
    def identity(self) -> str:
        return self.credentials.identity
