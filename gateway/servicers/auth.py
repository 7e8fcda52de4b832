"""AuthService: proves credentials against the broker and issues tokens."""

from __future__ import annotations

from memgw.v1 import auth_pb2

from gateway.auth.throttle import LoginThrottle
from gateway.auth.tokens import IssuedTokens, TokenService, choose
from gateway.broker.seam import Broker
from gateway.core.errors import InvalidArgument, Unauthenticated
from gateway.core.identity import MAX_ACCOUNT_ID, Credentials
from gateway.rpc.call import CallContext

# Upstream accepts any positive number of minutes; its exp wraps past 153 722 867 minutes (time.Duration
# overflow, docs/upstream.md "Lifetimes"): longer lifetimes are clamped to that (~292 years).
LONGEST_MIN = 153_722_867


class AuthService:
    SERVICE = "memgw.v1.AuthService"

    def __init__(
        self,
        broker: Broker,
        tokens: TokenService,
        access_min: int,
        refresh_min: int,
        throttle: LoginThrottle | None = None,
        *,
        max_min: int = 0,
        mode: str = "auto",
    ) -> None:
        self._broker = broker
        self._tokens = tokens
        self._access_min = access_min
        self._refresh_min = refresh_min
        self._throttle = throttle or LoginThrottle(0, 0)
        self._max_min = max_min  # 0: no cap (as upstream)
        self._mode = mode

    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, ctx: CallContext
    ) -> auth_pb2.AuthenticateResponse:
        creds = _credentials(request, self._mode)
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
        if not request.jwt_refresh_token:
            raise Unauthenticated("no refresh token", why="no token")
        access, refresh = self._expiries(request)  # first: a refused lifetime does not spend the token
        _, creds = self._tokens.spend_refresh(request.jwt_refresh_token)  # single use
        creds = await self._broker.open_session(creds)  # the broker still accepts this user
        return auth_pb2.RefreshTokenResponse(**_fields(self._tokens.issue(creds, access, refresh)))

    def _expiries(self, request: auth_pb2.AuthenticateRequest | auth_pb2.RefreshTokenRequest) -> tuple[int, int]:
        access = self._minutes(request, "token_expiry_in_minutes", self._access_min)
        refresh = self._minutes(request, "refresh_token_expiry_in_minutes", self._refresh_min)
        return access, refresh

    def _minutes(
        self, request: auth_pb2.AuthenticateRequest | auth_pb2.RefreshTokenRequest, name: str, default: int
    ) -> int:
        """Any positive number of minutes; absent, 0 or negative: the default (as upstream). Beyond
        ``--max-token-expiry-min``: InvalidArgument for a requested lifetime; a default is lowered to the cap."""
        value = int(getattr(request, name)) if request.HasField(name) else 0
        if value <= 0:
            value = min(default, self._max_min) if self._max_min else default
        if self._max_min and value > self._max_min:
            raise InvalidArgument(
                f"{name} is {value}; this gateway allows at most {self._max_min} minutes (--max-token-expiry-min)"
            )
        return min(value, LONGEST_MIN)

MAX_USERNAME = 255  # the broker's protocol line holds the user name; far longer is no user


def _credentials(request: auth_pb2.AuthenticateRequest, mode: str) -> Credentials:
    """Who logs in. Account id as upstream: body ``account_id`` if non-zero, else ``?accountId=``,
    else ``user$N``, else 1. The mode picks password or connection_token when both are sent."""
    username = request.username
    account_id = request.account_id  # REST: the body's, else ?accountId= (query_with_body)
    name, sep, account = username.partition("$")
    if sep and name:
        username = name
        if not account_id:
            if not (account.isascii() and account.isdigit()):
                raise InvalidArgument(f"username {request.username!r}: the part after '$' must be an account id")
            account_id = int(account) if len(account) <= 10 else MAX_ACCOUNT_ID + 1
    if not username:
        raise InvalidArgument("username is required")
    if len(username) > MAX_USERNAME:
        raise InvalidArgument(f"username must be at most {MAX_USERNAME} characters")
    account_id = account_id or 1
    if not 1 <= account_id <= MAX_ACCOUNT_ID:
        raise InvalidArgument(f"account_id must be a number between 1 and {MAX_ACCOUNT_ID}")
    password, token = choose(mode, request.password, request.connection_token)
    if not (password or token):
        wanted = {"password": "password", "token": "connection_token"}.get(mode, "password or connection_token")
        raise InvalidArgument(f"{wanted} is required")
    return Credentials(username=username, account_id=account_id, password=password, connection_token=token)



def _fields(issued: IssuedTokens) -> dict[str, object]:
    return {
        "expires_in": issued.access_ms,
        "jwt": issued.access,
        "jwt_refresh_token": issued.refresh,
        "refresh_token_expires_in": issued.refresh_ms,
    }
