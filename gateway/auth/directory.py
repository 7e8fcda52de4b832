"""Users and API keys: kept in JetStream KV, read from memory on every call.

Two buckets, shared by every replica on the broker:

* ``memgw_users``: one record per user (type, station patterns, a bcrypt hash of the password
  for the broker's configuration, ``tokens_after``); a deleted user stays as a tombstone
  (``deleted``), so tokens issued before stay refused.
* ``memgw_api_keys``: one record per key: its scope, the sha256 of its secret (never the
  secret), and the creator's broker credential sealed with AES-GCM (``TokenService.seal``).

Every replica watches both buckets (a KV watch: an ordered push consumer) and keeps them in
dicts, so admission never waits on the broker, and a change made on any replica (a revoked
key, a deleted user, a new password) is seen by all within milliseconds.

Without KV (an external Memphis broker: its users are its own) the directory is
*unmanaged*: the root user is management, any other user the broker accepts is an
application user of every station (the broker's own permissions apply), and the user and
key APIs answer FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import bcrypt
import orjson
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from gateway.auth.access import APPLICATION, MANAGEMENT, Access, patterns
from gateway.auth.tokens import TokenService
from gateway.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from gateway.core.identity import Credentials, Principal

log = logging.getLogger("gateway.auth")
USERS_BUCKET, KEYS_BUCKET = "memgw_users", "memgw_api_keys"
KEY_PREFIX = "mgw_"
_KEY_HEADER_PREFIXES = ("Bearer mgw_", "bearer mgw_")
_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    username: str
    type: str
    produce: tuple[str, ...]
    consume: tuple[str, ...]
    password_hash: str  # bcrypt, for the broker's configuration; never the password
    created_at: float
    tokens_after: float  # tokens and keys issued before are refused
    deleted: bool = False

    def access(self) -> Access:
        who = f"user {self.username}"
        if self.type == MANAGEMENT:
            return Access.everything(who)
        return Access(who=who, produce=self.produce, consume=self.consume)

    def dump(self) -> bytes:
        return orjson.dumps({
            "username": self.username, "type": self.type, "produce": self.produce, "consume": self.consume,
            "password_hash": self.password_hash, "created_at": self.created_at,
            "tokens_after": self.tokens_after, "deleted": self.deleted,
        })

    @classmethod
    def load(cls, raw: bytes) -> UserRecord:
        d = orjson.loads(raw)
        return cls(username=d["username"], type=d["type"], produce=tuple(d["produce"]),
                   consume=tuple(d["consume"]), password_hash=d["password_hash"], created_at=d["created_at"],
                   tokens_after=d["tokens_after"], deleted=d.get("deleted", False))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    id: str
    name: str
    username: str
    stations: tuple[str, ...]
    actions: tuple[str, ...]
    expires_at: float  # 0: never
    created_at: float
    secret_sha256: str
    sealed: str  # the creator's broker credential, AES-GCM under a key derived from jwt_secret

    def dump(self) -> bytes:
        return orjson.dumps({
            "id": self.id, "name": self.name, "username": self.username, "stations": self.stations,
            "actions": self.actions, "expires_at": self.expires_at, "created_at": self.created_at,
            "secret_sha256": self.secret_sha256, "sealed": self.sealed,
        })

    @classmethod
    def load(cls, raw: bytes) -> KeyRecord:
        d = orjson.loads(raw)
        return cls(id=d["id"], name=d["name"], username=d["username"], stations=tuple(d["stations"]),
                   actions=tuple(d["actions"]), expires_at=d["expires_at"], created_at=d["created_at"],
                   secret_sha256=d["secret_sha256"], sealed=d["sealed"])


def is_key_header(value: str | None) -> bool:
    """Whether an ``authorization`` value carries an API key rather than a JWT."""
    return value is not None and value.startswith(_KEY_HEADER_PREFIXES)


BCRYPT_ROUNDS = 10  # nats-server checks the hash at each connection of the user: ~50 ms each


def hash_password(password: str) -> str:
    """A bcrypt hash ($2a$, the prefix nats-server reads) of ``password``; slow on purpose: call it off the loop."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS, prefix=b"2a")).decode()


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Directory:
    def __init__(self, tokens: TokenService, root_user: str, *, managed: bool) -> None:
        self._tokens = tokens
        self.root_user = root_user
        self.managed = managed
        self._root = Access.everything(f"user {root_user}")
        self._unknowns: dict[str, Access] = {}  # users the directory does not know: the broker decides
        self._users: dict[str, UserRecord] = {}
        self._user_access: dict[str, Access] = {}
        self._keys: dict[str, KeyRecord] = {}
        # "Bearer mgw_..." -> (principal, access, expires_at); cleared on any change of users or keys
        self._verified: dict[str, tuple[Principal, Access, float]] = {}
        self._users_kv: KeyValue | None = None
        self._keys_kv: KeyValue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Any] = []
        # applies the users to the broker (the embedded nats-server's configuration); set by the app
        self.broker_sync: Callable[[list[UserRecord]], Awaitable[None]] | None = None
        self._sync_lock = asyncio.Lock()
        self._sync_tasks: set[asyncio.Task[None]] = set()

    # Lifecycle

    async def open(self, nc: Client, replicas: int = 1) -> None:
        """Open (or create) both buckets and load them; from then on their watches keep us current."""
        if not self.managed:
            return
        js = nc.jetstream()
        self._users_kv = await _bucket(js, USERS_BUCKET, replicas)
        self._keys_kv = await _bucket(js, KEYS_BUCKET, replicas)
        for kv, apply in ((self._users_kv, self._apply_user), (self._keys_kv, self._apply_key)):
            watcher = await _watch(kv)
            self._watchers.append(watcher)
            loaded = asyncio.get_running_loop().create_future()
            self._tasks.append(asyncio.create_task(self._follow(watcher, apply, loaded)))
            await loaded

    async def close(self) -> None:
        for task in [*self._tasks, *self._sync_tasks]:
            task.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        self._tasks.clear()
        self._watchers.clear()

    async def _follow(self, watcher: Any, apply: Callable[[str, bytes | None], None],
                      loaded: asyncio.Future[None]) -> None:
        async for entry in watcher:
            if entry is None:  # the initial values are all in
                if not loaded.done():
                    loaded.set_result(None)
                continue
            try:
                apply(entry.key, entry.value if entry.operation is None else None)
            except Exception:
                log.exception("unreadable record %s in the directory: ignored", entry.key)
            if not loaded.done() and entry.delta == 0:
                loaded.set_result(None)

    def _apply_user(self, key: str, raw: bytes | None) -> None:
        record = UserRecord.load(raw) if raw else None
        if record is None:
            self._users.pop(key, None)
            self._user_access.pop(key, None)
        else:
            self._users[key] = record
            self._user_access[key] = record.access()
        self._verified.clear()
        if self.broker_sync is not None:
            task = asyncio.get_running_loop().create_task(self.sync_broker())
            self._sync_tasks.add(task)
            task.add_done_callback(self._sync_tasks.discard)

    async def sync_broker(self) -> None:
        """Apply the current users to the broker (a no-op when they did not change)."""
        if self.broker_sync is None:
            return
        async with self._sync_lock:
            try:
                await self.broker_sync(self.users())
            except Exception:
                log.exception("could not apply the users to the broker")

    def _apply_key(self, key: str, raw: bytes | None) -> None:
        if raw:
            self._keys[key] = KeyRecord.load(raw)
        else:
            self._keys.pop(key, None)
        self._verified.clear()

    # The hot path (no awaits)

    def access_of(self, principal: Principal) -> Access:
        """The access of a JWT's principal; Unauthenticated if its user was deleted or changed since."""
        username = principal.username
        if username == self.root_user:
            return self._root
        record = self._users.get(username)
        if record is None:
            return self._unknown(username)
        if record.deleted or principal.issued_at < record.tokens_after:
            raise Unauthenticated(f"token of user {username} revoked (user deleted or changed)")
        return self._user_access[username]

    def broker_user_access(self, username: str) -> Access:
        """The access of a broker user by name (the control plane's requesters, named by
        nats-server): root, a user of the directory, or one the broker knows on its own."""
        if username == self.root_user:
            return self._root
        record = self._users.get(username)
        if record is None:
            return self._unknown(username)
        if record.deleted:
            raise PermissionDenied(f"user {username} was deleted")
        return self._user_access[username]

    def _unknown(self, username: str) -> Access:
        """A user the broker accepted that the directory does not know (an external broker's, or one
        configured outside the gateway): an application user of every station; the broker's permissions apply."""
        access = self._unknowns.get(username)
        if access is None:
            if len(self._unknowns) >= _CACHE_SIZE:
                self._unknowns.clear()
            access = self._unknowns[username] = Access(who=f"user {username}", produce=("*",), consume=("*",))
        return access

    def verify_key(self, header: str) -> tuple[Principal, Access]:
        cached = self._verified.get(header)
        now = time.time()
        if cached is not None and (not cached[2] or cached[2] > now):
            return cached[0], cached[1]
        key_id, _, secret = header[len("Bearer mgw_"):].strip().partition("_")
        record = self._keys.get(key_id)
        if record is None or not secret or not hmac.compare_digest(record.secret_sha256, _sha256(secret)):
            raise Unauthenticated("unknown or revoked API key")
        if record.expires_at and record.expires_at <= now:
            raise Unauthenticated(f"API key {key_id} expired")
        user = self._users.get(record.username)
        if record.username != self.root_user and (
            user is None or user.deleted or record.created_at < user.tokens_after
        ) and self.managed:
            raise Unauthenticated(f"API key {key_id} revoked: its user was deleted or changed")
        creds = self._tokens.unseal(record.sealed, record.username)
        principal = Principal(credentials=creds, issued_at=record.created_at)
        base = self._root if record.username == self.root_user else (
            self._user_access.get(record.username) or self._unknown(record.username))
        access = base.narrowed(f"API key {key_id} (user {record.username})", record.stations, record.actions)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.clear()
        self._verified[header] = (principal, access, record.expires_at)
        return principal, access

    # Users

    def require_managed(self, what: str) -> tuple[KeyValue, KeyValue]:
        if not self.managed or self._users_kv is None or self._keys_kv is None:
            raise FailedPrecondition(
                f"{what} are managed by the external Memphis broker, not by this gateway "
                "(the gateway manages them with its embedded broker or --control-plane)")
        return self._users_kv, self._keys_kv

    def users(self) -> list[UserRecord]:
        return sorted((u for u in self._users.values() if not u.deleted), key=lambda u: u.username)

    def user(self, username: str) -> UserRecord:
        record = self._users.get(username.lower())
        if record is None or record.deleted:
            raise NotFound(f"user {username} does not exist")
        return record

    async def put_user(self, username: str, password_hash: str, type_: str,
                       produce: tuple[str, ...], consume: tuple[str, ...]) -> UserRecord:
        users, _ = self.require_managed("users")
        if username == self.root_user:
            raise InvalidArgument(f"{username} is the root user, configured with --root-user/--root-password")
        now = time.time()
        old = self._users.get(username)
        record = UserRecord(
            username=username, type=type_, produce=produce, consume=consume, password_hash=password_hash,
            created_at=old.created_at if old is not None and not old.deleted else now, tokens_after=now,
        )
        await users.put(username, record.dump())
        self._apply_user(username, record.dump())  # seen here at once; the watch repeats it
        await self.sync_broker()  # the user can connect once this returns
        return record

    async def delete_user(self, username: str) -> UserRecord:
        users, _ = self.require_managed("users")
        old = self.user(username)
        tomb = UserRecord(username=old.username, type=old.type, produce=(), consume=(), password_hash="",
                          created_at=old.created_at, tokens_after=time.time(), deleted=True)
        await users.put(old.username, tomb.dump())
        self._apply_user(old.username, tomb.dump())
        await self.sync_broker()
        return old

    # API keys

    def keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda k: k.created_at)

    async def create_key(self, creds: Credentials, name: str, stations: tuple[str, ...],
                         actions: tuple[str, ...], expires_at: float) -> tuple[KeyRecord, str]:
        _, keys = self.require_managed("API keys")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(
            id=key_id, name=name, username=creds.username, stations=stations, actions=actions,
            expires_at=expires_at, created_at=time.time(), secret_sha256=_sha256(secret),
            sealed=self._tokens.seal(creds),
        )
        await keys.put(key_id, record.dump())
        self._apply_key(key_id, record.dump())
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    async def delete_key(self, key_id: str) -> KeyRecord:
        _, keys = self.require_managed("API keys")
        record = self._keys.get(key_id)
        if record is None:
            raise NotFound(f"API key {key_id} does not exist")
        await keys.delete(key_id)
        self._apply_key(key_id, None)
        return record

    def check_user_type(self, type_: str) -> str:
        type_ = (type_ or APPLICATION).lower()
        if type_ not in (MANAGEMENT, APPLICATION):
            raise InvalidArgument(f"type must be {MANAGEMENT} or {APPLICATION}, not {type_!r}")
        return type_


async def _bucket(js: Any, name: str, replicas: int) -> KeyValue:
    try:
        kv: KeyValue = await js.key_value(name)
        return kv
    except BucketNotFoundError:
        pass
    created: KeyValue = await js.create_key_value(bucket=name, history=1, replicas=replicas)
    return created


__all__ = ["Directory", "KeyRecord", "UserRecord", "is_key_header", "patterns"]


async def _watch(kv: Any, within_s: float = 10.0) -> Any:
    """``kv.watchall()``, retried while JetStream is not answering yet (a broker that just
    restarted answers "no responders" until its streams are recovered)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await kv.watchall()
        except ServiceUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
