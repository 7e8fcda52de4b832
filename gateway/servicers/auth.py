"""AuthService: proves credentials against the broker and issues tokens."""

from __future__ import annotations

from memgw.v1 import auth_pb2

from gateway.auth.throttle import LoginThrottle
from gateway.auth.tokens import REFRESH, IssuedTokens, TokenService
from gateway.broker.seam import Broker
from gateway.core.errors import InvalidArgument, Unauthenticated
from gateway.core.identity import MAX_ACCOUNT_ID, Credentials
from gateway.rpc.call import CallContext

MAX_EXPIRY_MIN = 30 * 24 * 60  # 30 days


class AuthService:
    SERVICE = "memgw.v1.AuthService"

    def __init__(
        self,
        broker: Broker,
        tokens: TokenService,
        access_min: int,
        refresh_min: int,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self._broker = broker
        self._tokens = tokens
        self._access_min = access_min
        self._refresh_min = refresh_min
        self._throttle = throttle or LoginThrottle(0, 0)

    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, ctx: CallContext
    ) -> auth_pb2.AuthenticateResponse:
        creds = _credentials(request)
        access, refresh = self._expiries(request)
        # failed logins are charged to the user and the caller's address; refused before the broker is asked
        attempt = self._throttle.reserve(creds.username, ctx.peer)
        try:
            creds = await self._broker.open_session(creds)  # proves them; the identity the broker accepted
        except Unauthenticated:
            raise  # the attempt stays charged
        except BaseException:
            self._throttle.succeeded(attempt)  # not the caller's fault (broker down, deadline)
            raise
        self._throttle.succeeded(attempt)
        return auth_pb2.AuthenticateResponse(**_fields(self._tokens.issue(creds, access, refresh)))

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, ctx: CallContext
    ) -> auth_pb2.RefreshTokenResponse:
        _, creds = self._tokens.verify(request.jwt_refresh_token, REFRESH)
        access, refresh = self._expiries(request)
        creds = await self._broker.open_session(creds)  # the broker still accepts this user
        return auth_pb2.RefreshTokenResponse(**_fields(self._tokens.issue(creds, access, refresh)))

    def _expiries(self, request: auth_pb2.AuthenticateRequest | auth_pb2.RefreshTokenRequest) -> tuple[int, int]:
        access = _minutes(request, "token_expiry_in_minutes", self._access_min)
        refresh = _minutes(request, "refresh_token_expiry_in_minutes", self._refresh_min)
        return access, refresh


def _credentials(request: auth_pb2.AuthenticateRequest) -> Credentials:
    username, account_id = request.username, request.account_id if request.HasField("account_id") else 1
    name, sep, account = username.rpartition("$")
    if sep and account.isascii() and account.isdigit() and name:
        username, account_id = name, int(account) if len(account) <= 10 else MAX_ACCOUNT_ID + 1
    if not username:
        raise InvalidArgument("username is required")
    if bool(request.password) == bool(request.connection_token):
        raise InvalidArgument("exactly one of password and connection_token is required")
    if not 1 <= account_id <= MAX_ACCOUNT_ID:
        raise InvalidArgument(f"account_id must be a number between 1 and {MAX_ACCOUNT_ID}")
    return Credentials(
        username=username,
        account_id=account_id,
        password=request.password,
        connection_token=request.connection_token,
    )


def _minutes(request: auth_pb2.AuthenticateRequest | auth_pb2.RefreshTokenRequest, name: str, default: int) -> int:
    if not request.HasField(name):
        return default
    value = int(getattr(request, name))
    if not 1 <= value <= MAX_EXPIRY_MIN:
        raise InvalidArgument(f"{name} must be between 1 and {MAX_EXPIRY_MIN}")
    return value


def _fields(issued: IssuedTokens) -> dict[str, object]:
    return {
        "expires_in": issued.access_ms,
        "jwt": issued.access,
        "jwt_refresh_token": issued.refresh,
        "refresh_token_expires_in": issued.refresh_ms,
    }
