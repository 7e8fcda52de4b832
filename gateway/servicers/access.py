"""UserService and ApiKeyService: users of the broker and scoped API keys (management callers only:
the guard checks ``(memgw.v1.access).action: ACTION_MANAGE`` before these run).

Every change is written to the audit log (``gateway.audit``): who, what, when; never a secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from memgw.v1 import access_pb2

from gateway.auth.access import STATION_ACTIONS, patterns
from gateway.auth.directory import Directory, KeyRecord, UserRecord, hash_password
from gateway.core.errors import InvalidArgument
from gateway.core.names import validate_name
from gateway.rpc.call import CallContext

audit = logging.getLogger("gateway.audit")
MAX_PASSWORD = 128
MAX_KEY_MINUTES = 10 * 365 * 24 * 60  # ten years
MAX_KEY_NAME = 128


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else ""


def _user(record: UserRecord) -> access_pb2.User:
    return access_pb2.User(
        username=record.username, type=record.type, created_at=_time(record.created_at),
        permissions=access_pb2.Permissions(produce=record.produce, consume=record.consume),
    )


def _key(record: KeyRecord) -> access_pb2.ApiKey:
    return access_pb2.ApiKey(
        id=record.id, name=record.name, stations=record.stations, actions=record.actions,
        expires_at=_time(record.expires_at), username=record.username, created_at=_time(record.created_at),
    )


def _actor(ctx: CallContext) -> str:
    return ctx.require_principal().username


class UserService:
    SERVICE = "memgw.v1.UserService"

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    async def CreateUser(
        self, request: access_pb2.CreateUserRequest, ctx: CallContext
    ) -> access_pb2.CreateUserResponse:
        reason = validate_name(request.username, "user")
        if reason is not None:
            raise InvalidArgument(f"invalid username: {reason}")
        username = request.username.lower()
        if not 1 <= len(request.password) <= MAX_PASSWORD:
            raise InvalidArgument(f"password is required (1 to {MAX_PASSWORD} characters)")
        type_ = self._directory.check_user_type(request.type)
        produce = patterns(request.permissions.produce, "permissions.produce")
        consume = patterns(request.permissions.consume, "permissions.consume")
        if type_ == "management":
            produce = consume = ("*",)
        self._directory.require_managed("users")
        password_hash = await asyncio.to_thread(hash_password, request.password)
        record = await self._directory.put_user(username, password_hash, type_, produce, consume)
        audit.info("user %s created or replaced user %s (type %s, produce %s, consume %s) at %s",
                   _actor(ctx), username, type_, list(produce), list(consume), _time(time.time()))
        return access_pb2.CreateUserResponse(success=True, user=_user(record))

    async def ListUsers(self, request: access_pb2.ListUsersRequest, ctx: CallContext) -> access_pb2.ListUsersResponse:
        return access_pb2.ListUsersResponse(users=[_user(u) for u in self._directory.users()])

    async def GetUser(self, request: access_pb2.GetUserRequest, ctx: CallContext) -> access_pb2.GetUserResponse:
        return access_pb2.GetUserResponse(user=_user(self._directory.user(request.username)))

    async def DeleteUser(
        self, request: access_pb2.DeleteUserRequest, ctx: CallContext
    ) -> access_pb2.DeleteUserResponse:
        record = await self._directory.delete_user(request.username.lower())
        audit.info("user %s deleted user %s (its tokens and API keys are revoked) at %s",
                   _actor(ctx), record.username, _time(time.time()))
        return access_pb2.DeleteUserResponse(success=True)


class ApiKeyService:
    SERVICE = "memgw.v1.ApiKeyService"

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    async def CreateApiKey(
        self, request: access_pb2.CreateApiKeyRequest, ctx: CallContext
    ) -> access_pb2.CreateApiKeyResponse:
        name = request.name.strip()
        if not 1 <= len(name) <= MAX_KEY_NAME:
            raise InvalidArgument(f"name is required (1 to {MAX_KEY_NAME} characters)")
        stations = patterns(request.stations, "stations")
        if not stations:
            raise InvalidArgument('stations: at least one station name or pattern (e.g. ["orders", "web-*"])')
        actions = tuple(dict.fromkeys(a.strip().lower() for a in request.actions))
        if not actions or any(a not in STATION_ACTIONS for a in actions):
            raise InvalidArgument('actions: one or both of "produce" and "consume"')
        expires_at = 0.0
        if request.HasField("expires_in_minutes"):
            if not 1 <= request.expires_in_minutes <= MAX_KEY_MINUTES:
                raise InvalidArgument(f"expires_in_minutes must be between 1 and {MAX_KEY_MINUTES}")
            expires_at = time.time() + request.expires_in_minutes * 60
        creds = ctx.require_principal().credentials
        record, key = await self._directory.create_key(creds, name, stations, actions, expires_at)
        audit.info("user %s created API key %s %r (stations %s, actions %s, expires %s) at %s", creds.username,
                   record.id, name, list(stations), list(actions), _time(expires_at) or "never",
                   _time(record.created_at))
        return access_pb2.CreateApiKeyResponse(
            id=record.id, key=key, name=name, stations=stations, actions=actions, expires_at=_time(expires_at),
        )

    async def ListApiKeys(
        self, request: access_pb2.ListApiKeysRequest, ctx: CallContext
    ) -> access_pb2.ListApiKeysResponse:
        return access_pb2.ListApiKeysResponse(keys=[_key(k) for k in self._directory.keys()])

    async def DeleteApiKey(
        self, request: access_pb2.DeleteApiKeyRequest, ctx: CallContext
    ) -> access_pb2.DeleteApiKeyResponse:
        record = await self._directory.delete_key(request.id)
        audit.info("user %s revoked API key %s %r of user %s at %s", _actor(ctx), record.id, record.name,
                   record.username, _time(time.time()))
        return access_pb2.DeleteApiKeyResponse(success=True)
