"""Access and refresh tokens (JWT, HS256) that never reveal a credential.

A token names the broker user and carries the user's broker credential sealed
with AES-256-GCM under a key derived from the shared secret, so any replica with
the same ``jwt_secret`` can open the user's broker connection, nothing has to be
broadcast, and a token holder reads no password or connection token from it.
Signing and sealing use distinct keys derived from the secret (HKDF).
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from dataclasses import dataclass

import jwt
import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.core.errors import Unauthenticated
from gateway.core.identity import Credentials, Principal
from gateway.core.keys import derive_key

ALGORITHM = "HS256"
ISSUER = "memphis-gateway"
ACCESS, REFRESH = "access", "refresh"


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access: str
    refresh: str
    access_ms: int
    refresh_ms: int


class TokenService:
    CACHE_SIZE = 10_000

    def __init__(self, secret: str) -> None:
        self._signing_key = derive_key(secret, "jwt-signing")
        self._aead = AESGCM(derive_key(secret, "credential-sealing"))
        # token -> (expiry, kind, principal, credentials): a token verified once stays valid until it
        # expires, so the hot path skips the HMAC, the JSON and the AES-GCM of a repeated token.
        self._verified: dict[str, tuple[float, str, Principal, Credentials]] = {}
        self._by_header: dict[str, tuple[float, str, Principal, Credentials]] = {}  # "Bearer <token>" -> the same

    def issue(self, creds: Credentials, access_minutes: int, refresh_minutes: int) -> IssuedTokens:
        sealed = self.seal(creds)
        return IssuedTokens(
            access=self._sign(creds, sealed, ACCESS, access_minutes),
            refresh=self._sign(creds, sealed, REFRESH, refresh_minutes),
            access_ms=access_minutes * 60_000,
            refresh_ms=refresh_minutes * 60_000,
        )

    def verify(self, token: str, kind: str) -> tuple[Principal, Credentials]:
        """The principal and credentials of a valid token of ``kind``; Unauthenticated otherwise."""
        cached = self._verified.get(token)
        if _fresh(cached, kind):
            assert cached is not None
            return cached[2], cached[3]
        principal, creds, expiry = self._verify(token, kind)
        if len(self._verified) >= self.CACHE_SIZE:
            now = time.time()
            self._verified = {t: v for t, v in self._verified.items() if v[0] > now}
            if len(self._verified) >= self.CACHE_SIZE:
                self._verified.clear()
        self._verified[token] = (expiry, kind, principal, creds)
        return principal, creds

    def verify_header(self, value: str | None, kind: str) -> tuple[Principal, Credentials]:
        """``verify(bearer(value), kind)``, cached by the header value too (no parsing on a hit).

        A cache of its own: a bare token is a key of ``_verified``, and must not pass as a header."""
        cached = self._by_header.get(value) if value else None
        if _fresh(cached, kind):
            assert cached is not None
            return cached[2], cached[3]
        token = bearer(value)
        if not token.isascii():  # a JWT is base64url; non-UTF-8 header bytes would not even encode
            raise Unauthenticated("not a JWT")
        principal, creds = self.verify(token, kind)
        assert value is not None  # bearer() refused a missing one
        if len(self._by_header) >= self.CACHE_SIZE:
            self._by_header.clear()
        self._by_header[value] = self._verified[token]
        return principal, creds

    def _verify(self, token: str, kind: str) -> tuple[Principal, Credentials, float]:
        try:
            claims = jwt.decode(
                token,
                self._signing_key,
                algorithms=[ALGORITHM],  # never "none", never another family
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "typ", "crd"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {type(exc).__name__}") from None
        if claims.get("typ") != kind:
            raise Unauthenticated(f"a {claims.get('typ')} token where an {kind} token is needed")
        creds = self.unseal(claims["crd"], claims["sub"])
        issued = claims.get("ims")
        issued_at = issued / 1000 if isinstance(issued, int) else float(claims["iat"])
        principal = Principal(credentials=creds, issued_at=issued_at)
        return principal, creds, float(claims["exp"])

    def _sign(self, creds: Credentials, sealed: str, kind: str, minutes: int) -> str:
        now_ms = int(time.time() * 1000)
        now = now_ms // 1000
        claims = {
            "iss": ISSUER,
            "sub": creds.username,
            "acc": creds.account_id,
            "typ": kind,
            "iat": now,
            "ims": now_ms,  # iat in ms: a token issued after a revocation in the same second stays valid
            "exp": now + minutes * 60,
            "jti": uuid.uuid4().hex,
            "crd": sealed,
        }
        return jwt.encode(claims, self._signing_key, algorithm=ALGORITHM)

    def seal(self, creds: Credentials) -> str:
        """``creds`` encrypted and authenticated (AES-GCM, bound to the user name), as text."""
        nonce = os.urandom(12)
        plain = orjson.dumps([creds.username, creds.account_id, creds.password, creds.connection_token])
        sealed = self._aead.encrypt(nonce, plain, creds.username.encode())
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def unseal(self, sealed: str, subject: str) -> Credentials:
        try:
            raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], subject.encode())
            username, account_id, password, connection_token = orjson.loads(plain)
        except Exception:
            raise Unauthenticated("credential seal does not open") from None
        return Credentials(
            username=username, account_id=account_id, password=password, connection_token=connection_token
        )


def _fresh(cached: tuple[float, str, Principal, Credentials] | None, kind: str) -> bool:
    """A cache entry for a token of ``kind`` that has not expired."""
    return cached is not None and cached[1] == kind and cached[0] > time.time()


def bearer(metadata_value: str | None) -> str:
    """The token of an ``authorization`` value ("Bearer <jwt>"); Unauthenticated if absent."""
    if not metadata_value:
        raise Unauthenticated("no token")
    scheme, _, token = metadata_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("not a bearer token")
    return token.strip()
