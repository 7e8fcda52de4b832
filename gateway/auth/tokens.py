"""Access and refresh tokens (JWT, HS256) that never reveal a credential.

A token names the broker user and carries the user's broker credential sealed
with AES-256-GCM under a key derived from the shared secret, so any replica with
the same ``jwt_secret`` can open the user's broker connection, nothing has to be
broadcast, and a token holder reads no password or connection token from it.
Signing and sealing use distinct keys derived from the secret (HKDF).

Migration from the upstream gateway (docs/upstream.md, "Tokens"): when its secrets are configured,
tokens it issued are accepted too: HS256/384/512 with ``username``, ``password`` /
``connection_token`` and ``account_id`` claims (access tokens under ``JWT_SECRET``, refresh tokens
under ``REFRESH_JWT_SECRET``), and its legacy ``{"exp"}``-only access tokens, which act as the root
user, as upstream. The credentials they carry open the broker session; the tokens issued in their
place are ours (sealed).

Refresh tokens are single-use: a used one's ``jti`` (an upstream one's SHA-256) is remembered until it
expires and a second use is refused ("refresh token already used"). The memory is this process's: with several
replicas, a refresh token can be used once per replica (README, "Replicas").
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.core.errors import Unauthenticated
from gateway.core.identity import Credentials, Principal
from gateway.core.keys import derive_key

ALGORITHM = "HS256"
UPSTREAM_ALGORITHMS = ["HS256", "HS384", "HS512"]  # golang-jwt's SigningMethodHMAC check
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

    def __init__(
        self,
        secret: str,
        *,
        upstream_secret: str = "",
        upstream_refresh_secret: str = "",
        root: Credentials | None = None,
        mode: str = "auto",
    ) -> None:
        self._upstream = {ACCESS: upstream_secret, REFRESH: upstream_refresh_secret}
        self._root = root  # who a legacy upstream token acts as
        self._mode = mode
        self._used: dict[str, float] = {}  # jti of a used refresh token -> its expiry
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
        try:
            principal, creds, expiry = self._verify(token, kind)
        except Unauthenticated as ours:
            if not self._upstream[kind] or ours.why == "token expired":
                raise
            principal, creds, expiry = self._verify_upstream(token, kind, ours)
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
            raise Unauthenticated("not a JWT", why="malformed token")
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
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", why="token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {type(exc).__name__}", why=_why(exc)) from None
        if claims.get("typ") != kind:
            raise Unauthenticated(f"a {claims.get('typ')} token where an {kind} token is needed",
                                  why=f"not an {kind} token" if kind == ACCESS else f"not a {kind} token")
        creds = self.unseal(claims["crd"], claims["sub"])
        issued = claims.get("ims")
        issued_at = issued / 1000 if isinstance(issued, int) else float(claims["iat"])
        principal = Principal(credentials=creds, issued_at=issued_at)
        return principal, creds, float(claims["exp"])

    def _verify_upstream(self, token: str, kind: str, ours: Unauthenticated) -> tuple[Principal, Credentials, float]:
        """A token the upstream gateway issued (docs/upstream.md, "Claims, exactly"); ``ours`` if not one."""
        try:
            with warnings.catch_warnings():
                # upstream secrets have any length (pyjwt 2.10 warns about short ones; older ones do not)
                warnings.simplefilter("ignore", getattr(jwt, "InsecureKeyLengthWarning", UserWarning))
                claims = jwt.decode(
                    token, self._upstream[kind], algorithms=UPSTREAM_ALGORITHMS, options={"require": ["exp"]}
                )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("upstream token expired", why="token expired") from None
        except jwt.PyJWTError:
            raise ours from None
        if not _number(claims.get("exp")):
            raise ours
        if "username" not in claims:  # legacy: {"exp"} only, acts as the root user (upstream L163-198)
            if kind != ACCESS or self._root is None:
                raise ours
            creds = self._root
        else:
            creds = self._upstream_credentials(claims, ours)
        return Principal(credentials=creds), creds, float(claims["exp"])

    def _upstream_credentials(self, claims: dict[str, Any], ours: Unauthenticated) -> Credentials:
        username, password, token = claims.get("username"), claims.get("password", ""), claims.get(
            "connection_token", "")
        account = claims.get("account_id", 1)
        if not (isinstance(username, str) and username and isinstance(password, str) and isinstance(token, str)):
            raise ours
        if not _number(account) or int(account) < 1:
            account = 1  # upstream: account 0 -> 1; token mode forces 1
        password, token = choose(self._mode, password, token)
        if not (password or token):
            raise Unauthenticated("upstream token carries no credential for this mode", why="invalid token")
        return Credentials(username=username, account_id=int(account), password=password, connection_token=token)

    def spend_refresh(self, token: str) -> tuple[Principal, Credentials]:
        """``verify(token, REFRESH)``, once: a refresh token we issued is refused after its first use."""
        principal, creds = self.verify(token, REFRESH)
        jti, exp = _jti(token)
        if jti is None:  # an upstream refresh token has no jti: its digest stands for it
            jti = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        if self._used.get(jti, 0.0) > now:
            raise Unauthenticated(f"refresh token of {creds.username} used twice", why="refresh token already used")
        if len(self._used) >= self.CACHE_SIZE:
            self._used = {j: e for j, e in self._used.items() if e > now}
        self._used[jti] = exp
        return principal, creds

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
    """The token of an ``authorization`` value; Unauthenticated if absent or malformed.

    As upstream (docs/upstream.md, "Presenting a token"): exactly two fields separated by one space,
    the second is the token, the first any word: ``Bearer <jwt>``, ``Bearer: <jwt>`` (Debezium),
    ``JWT <jwt>``, ``bearer <jwt>``."""
    if not metadata_value:
        raise Unauthenticated("no token", why="no token")
    fields = metadata_value.split(" ")
    if len(fields) != 2 or not fields[0] or not fields[1]:
        raise Unauthenticated("malformed Authorization header",
                              why="malformed Authorization header: use 'Bearer <token>'")
    return fields[1]


def choose(mode: str, password: str, connection_token: str) -> tuple[str, str]:
    """(password, connection_token) with the one the mode does not use emptied (auto: password wins)."""
    if mode == "token" or (mode == "auto" and not password):
        return "", connection_token
    return password, ""


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _why(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not valid yet"
    if isinstance(exc, (jwt.DecodeError, jwt.InvalidAlgorithmError)):
        return "malformed token"
    return "invalid token"


def _jti(token: str) -> tuple[str | None, float]:
    """The jti and exp of a verified token (no second signature check)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    jti = claims.get("jti")
    return (jti if isinstance(jti, str) else None), float(claims.get("exp", 0))
