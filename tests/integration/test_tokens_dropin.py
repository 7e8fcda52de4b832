"""Tokens as the upstream's users present them, over REST and gRPC (issue 11).

- refresh tokens are single-use (ours and the upstream's): a second use is 401 / UNAUTHENTICATED
  ``refresh token already used``, whichever protocol used it first;
- tokens the upstream issued (HS256 with ``JWT_SECRET``; claims ``username``, ``account_id``, ``password``,
  ``exp``, docs/upstream.md "Claims, exactly") work in gRPC metadata as in REST headers;
- the documented lifetimes (the README's 6000000, the console's 525600 and 10000092 minutes) are accepted
  over gRPC as over REST, and the tokens carry them;
- ``--max-token-expiry-min`` caps requested lifetimes (400 / INVALID_ARGUMENT naming the flag), and the
  default lifetimes above the cap are lowered to it (a login that asks for nothing still works).
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import AsyncIterator

import grpc
import jwt
import pytest
from memgw.v1 import auth_pb2, produce_pb2

from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer, jwt_payload, running_gateway, settings_for

UPSTREAM_SECRET = "JWT_TEST_PURPOSE"
UPSTREAM_REFRESH_SECRET = "REFRESH_JWT_TEST_PURPOSE"


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:  # type: ignore[no-untyped-def]
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("gw"), upstream_jwt_secret=UPSTREAM_SECRET,
                            upstream_refresh_jwt_secret=UPSTREAM_REFRESH_SECRET)
    async with running_gateway(settings) as clients:
        yield clients


def sign(claims: dict[str, object], secret: str) -> str:
    """HS256 as the upstream signs (golang-jwt takes a key of any length; PyJWT warns below 32 bytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", getattr(jwt, "InsecureKeyLengthWarning", UserWarning))
        return jwt.encode(claims, secret, algorithm="HS256")


def upstream_access(minutes: int = 60, secret: str = UPSTREAM_SECRET) -> str:
    claims = {"username": ROOT_USER, "account_id": 1, "password": ROOT_PASSWORD, "connection_token": "",
              "exp": int(time.time()) + minutes * 60}
    return sign(claims, secret)


def upstream_refresh(minutes: int = 600) -> str:
    claims = {"username": ROOT_USER, "account_id": 1, "password": ROOT_PASSWORD, "connection_token": "",
              "token_exp": int(time.time()) + 3600, "exp": int(time.time()) + minutes * 60}
    return sign(claims, UPSTREAM_REFRESH_SECRET)


async def grpc_produce(gw: Clients, token: str, station: str = "tok-dropin") -> None:
    await gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station=station, body={"content_type": "text/plain", "data": b"x"}),
        metadata=bearer(token))


async def rest_refresh(gw: Clients, token: str) -> tuple[int, dict[str, object]]:
    status, body, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": token})
    return status, body


async def grpc_refresh(gw: Clients, token: str, **lifetimes: int) -> auth_pb2.RefreshTokenResponse:
    return await gw.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=token, **lifetimes))


async def test_a_refresh_token_is_single_use_over_rest_and_grpc(gw: Clients) -> None:
    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
    assert status == 200
    first = str(body["jwt_refresh_token"])
    status, body = await rest_refresh(gw, first)
    assert status == 200, body
    second = str(body["jwt_refresh_token"])
    status, body = await rest_refresh(gw, first)  # reused over REST
    assert status == 401 and body.get("reason") == "refresh token already used", body
    with pytest.raises(grpc.aio.AioRpcError) as err:  # reused over gRPC
        await grpc_refresh(gw, first)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.value.details() or "")
    # the replacement works once, over gRPC this time, and then neither protocol takes it
    third = (await grpc_refresh(gw, second)).jwt_refresh_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_refresh(gw, second)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, body = await rest_refresh(gw, second)
    assert status == 401 and body.get("reason") == "refresh token already used", body
    status, body = await rest_refresh(gw, third)
    assert status == 200, body


async def test_an_upstream_refresh_token_is_single_use_too(gw: Clients) -> None:
    token = upstream_refresh()
    status, body = await rest_refresh(gw, token)
    assert status == 200, body
    assert ROOT_PASSWORD.encode() not in jwt_payload(str(body["jwt"]))  # exchanged for ours: sealed
    status, body = await rest_refresh(gw, token)
    assert status == 401 and body.get("reason") == "refresh token already used", body
    other = upstream_refresh(minutes=601)
    assert (await grpc_refresh(gw, other)).jwt
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_refresh(gw, other)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_upstream_issued_access_tokens_work_in_grpc_metadata(gw: Clients) -> None:
    token = upstream_access()
    await grpc_produce(gw, token)
    # Debezium's "Bearer: <jwt>" and another word, as upstream splits the header
    for word in ("Bearer:", "JWT", "bearer"):
        await gw.produce.ProduceSingle(
            produce_pb2.ProduceSingleRequest(station="tok-dropin", body={"content_type": "text/plain", "data": b"y"}),
            metadata=(("authorization", f"{word} {token}"),))
    legacy = sign({"exp": int(time.time()) + 600}, UPSTREAM_SECRET)  # acts as ROOT_USER
    await grpc_produce(gw, legacy)
    status, body, _ = await gw.post("/stations/tok-dropin/produce/single", raw=b"z", token=token,
                                    headers={"Content-Type": "text/plain"})
    assert status == 200, body
    for bad, why in ((upstream_access(secret="another-secret"), "bad signature"),
                     (upstream_access(minutes=-5), "token expired")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_produce(gw, bad)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert why in (err.value.details() or ""), err.value.details()


@pytest.mark.parametrize(("access", "refresh"), [(6000000, 10000092), (525600, 525600), (10000092, 6000000)])
async def test_documented_lifetimes_are_accepted_over_grpc(gw: Clients, access: int, refresh: int) -> None:
    before = time.time()
    reply = await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(
        username=ROOT_USER, password=ROOT_PASSWORD, token_expiry_in_minutes=access,
        refresh_token_expiry_in_minutes=refresh))
    assert (reply.expires_in, reply.refresh_token_expires_in) == (access * 60_000, refresh * 60_000)
    for token, minutes in ((reply.jwt, access), (reply.jwt_refresh_token, refresh)):
        exp = json.loads(jwt_payload(token))["exp"]
        assert before + minutes * 60 - 1 <= exp <= time.time() + minutes * 60 + 1
    await grpc_produce(gw, reply.jwt)
    again = await grpc_refresh(gw, reply.jwt_refresh_token, token_expiry_in_minutes=access,
                               refresh_token_expiry_in_minutes=refresh)
    assert (again.expires_in, again.refresh_token_expires_in) == (access * 60_000, refresh * 60_000)
    await grpc_produce(gw, again.jwt)
    # and the same request over REST
    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD,
                                                            "token_expiry_in_minutes": access,
                                                            "refresh_token_expiry_in_minutes": refresh})
    assert status == 200 and body["expires_in"] == access * 60_000, body


@pytest.fixture(scope="module")
async def capped(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:  # type: ignore[no-untyped-def]
    # the refresh default (300) is above the cap: lowered to it
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("capped"), max_token_expiry_min=60)
    async with running_gateway(settings) as clients:
        yield clients


async def test_max_token_expiry_caps_requested_lifetimes(capped: Clients) -> None:
    login = {"username": ROOT_USER, "password": ROOT_PASSWORD}
    status, body, _ = await capped.post("/auth/authenticate", login)  # asks for nothing: the defaults, capped
    assert status == 200, body
    assert (body["expires_in"], body["refresh_token_expires_in"]) == (15 * 60_000, 60 * 60_000)
    status, body, _ = await capped.post("/auth/authenticate", {**login, "token_expiry_in_minutes": 60,
                                                                "refresh_token_expiry_in_minutes": 60})
    assert status == 200, body
    refresh = str(body["jwt_refresh_token"])
    for field in ("token_expiry_in_minutes", "refresh_token_expiry_in_minutes"):
        status, body, _ = await capped.post("/auth/authenticate", {**login, field: 6000000})
        assert status == 400, body
        text = json.dumps(body)
        assert field in text and "at most 60 minutes" in text and "--max-token-expiry-min" in text, body
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await capped.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER, password=ROOT_PASSWORD,
                                                                        **{field: 61}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-token-expiry-min" in (err.value.details() or "")
    # a refused refresh request does not spend the refresh token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await capped.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=refresh,
                                                                    token_expiry_in_minutes=525600))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await capped.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=refresh))
    assert reply.refresh_token_expires_in == 60 * 60_000
    station = f"cap-{uuid.uuid4().hex[:6]}"
    await grpc_produce(capped, reply.jwt, station)
