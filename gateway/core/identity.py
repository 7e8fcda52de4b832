"""Who calls: a broker user's credentials, and the authenticated principal of a call.

One identity everywhere: :attr:`Credentials.identity` keys the caller's rate limits, stream
quota and broker session alike, so a user is one user whatever else differs between their
tokens. It names the user *the broker accepted*: tokens are issued for the credentials as the
broker took them (``gateway.broker.sessions.SessionPool.get`` normalises the account of a user
memphis-py let in under the bare name), so ``root$2`` ... ``root$7`` are all ``root$1`` on a
broker that only knows ``root``; a connection token is its own identity, whatever username
comes with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

MAX_ACCOUNT_ID = 2**31 - 1  # account ids are int32 on the broker side


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What the broker needs to let a user in; never logged, never in clear in a token."""

    username: str
    account_id: int
    password: str = field(default="", repr=False)
    connection_token: str = field(default="", repr=False)
    # The broker user this is: ``<user>$<account id>`` as memphis-py names it on the wire, or for a
    # connection token (the broker knows the token, not the name sent with it) a digest of the
    # token. Made once: every call asks (limits, session pool) and credentials outlive calls.
    identity: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.connection_token:
            identity = "token:" + hashlib.sha256(self.connection_token.encode()).hexdigest()[:32]
        else:
            identity = f"{self.username}${self.account_id}"
        object.__setattr__(self, "identity", identity)


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
