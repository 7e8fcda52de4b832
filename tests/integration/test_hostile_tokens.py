"""Hostile tokens: every one is 401 ({"message": "Unauthorized"}) / UNAUTHENTICATED, none accepted.

Each case is presented three ways against a real gateway and nats-server: the REST
``Authorization`` header, the REST ``?authorization=`` query parameter, and gRPC metadata. The
tokens are forged here with pyjwt: ``alg: none``, another key, another algorithm (HS512 with the
right key, RS256 with an attacker's key, the RS/HS confusion), expired (forged with the real key
and issued for real), tampered claims, refresh-as-access and access-as-refresh, garbage and
wrong schemes. A control case (the real access token) must be accepted the same three ways.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hmac
import json
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from memgw.v1 import auth_pb2, monitoring_pb2, produce_pb2

from gateway.auth.tokens import ALGORITHM, TokenService
from tests.harness import JWT_SECRET, ROOT_PASSWORD, ROOT_USER, Clients, is_unauthorized, running_gateway, settings_for


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    async with running_gateway(settings_for(nats_server.url, tmp_path_factory.mktemp("gw"))) as clients:
        yield clients


@pytest.fixture(scope="module")
async def issued(gw: Clients) -> dict[str, Any]:
    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
    assert status == 200
    return dict(body)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{signature}"


def real_key() -> bytes:
    return TokenService(JWT_SECRET)._signing_key  # the gateway's HKDF-derived signing key


def forged(claims: dict[str, Any], **changes: Any) -> str:
    """Claims changed and signed with the gateway's real key (what only a key holder could do)."""
    out = {**claims, **changes}
    for key in [k for k, v in changes.items() if v is None]:
        del out[key]
    return jwt.encode(out, real_key(), algorithm=ALGORITHM)


def tamper(token: str, **changes: Any) -> str:
    """The payload changed, the original signature kept."""
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps({**claims_of(token), **changes}).encode())}.{signature}"


def hostile_cases(access: str, refresh: str) -> dict[str, str]:
    """name -> the full Authorization header value."""
    claims = claims_of(access)
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    header, payload, signature = access.split(".")
    with warnings.catch_warnings():  # pyjwt warns that 32 bytes are short for HS512: it is the attacker's choice
        warnings.simplefilter("ignore")
        hs512 = jwt.encode(claims, real_key(), algorithm="HS512")
    tokens = {
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, claims),
        "alg None": unsigned({"alg": "None", "typ": "JWT"}, claims),
        "alg NONE, original signature": unsigned({"alg": "NONE", "typ": "JWT"}, claims, signature),
        "alg none, no dot": unsigned({"alg": "none"}, claims)[:-1],
        "HS256 with another key": jwt.encode(claims, "another-key-" + "y" * 40, algorithm="HS256"),
        "HS256 with the configured secret (not the derived key)": jwt.encode(claims, JWT_SECRET, algorithm="HS256"),
        "HS512 with the real key": hs512,
        "RS256 with an attacker key": jwt.encode(claims, rsa_key, algorithm="RS256"),
        "RS/HS confusion: HS256 keyed with a public key": unsigned(
            {"alg": "HS256", "typ": "JWT"}, claims,
            b64(hmac.new(public_pem, f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
                f"{b64(json.dumps(claims).encode())}".encode(), "sha256").digest())),
        "signature stripped": f"{header}.{payload}.",
        "signature of another token": f"{header}.{payload}.{refresh.split('.')[2]}",
        "expired (real key)": forged(claims, iat=now - 3600, exp=now - 60),
        "expired one second ago (real key)": forged(claims, exp=now - 1),
        "no exp (real key)": forged(claims, exp=None),
        "no typ (real key)": forged(claims, typ=None),
        "wrong issuer (real key)": forged(claims, iss="someone-else"),
        "not yet valid (real key)": forged(claims, nbf=now + 3600),
        "sealed credential of another subject (real key)": forged(claims, sub="admin"),
        "no sealed credential (real key)": forged(claims, crd=None),
        "garbage sealed credential (real key)": forged(claims, crd="A" * 80),
        "tampered sub": tamper(access, sub="admin"),
        "tampered exp": tamper(access, exp=now + 10**8),
        "tampered typ of a refresh token": tamper(refresh, typ="access"),
        "refresh token as access": refresh,
        "garbage": "garbage",
        "three dots": "a.b.c",
        "empty segments": "..",
        "base64 of JSON, not a JWT": b64(b'{"sub": "root"}'),
        "very long": "A" * 6000,
        "header only": header,
        "access token twice": f"{access}.{access}",
        "access token with a suffix": access + "x",
        "access token truncated": access[:-3],
    }
    values = {name: f"Bearer {tok}" for name, tok in tokens.items()}
    values.update({
        "empty Bearer": "Bearer ",
        "Bearer alone": "Bearer",
        "Basic credentials": "Basic " + base64.b64encode(f"{ROOT_USER}:{ROOT_PASSWORD}".encode()).decode(),
        # (any one-word scheme before a valid token is accepted, as the upstream does: Debezium sends "Bearer:")
        "no scheme, real token": access,
        "Bearer of two tokens": f"Bearer {access}, Bearer garbage",
        "JSON": '{"alg": "none"}',
    })  # fmt: skip
    return values


async def _get(gw: Clients, path: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with gw.http.get(gw.base + path, headers=headers) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw), resp.headers
        except ValueError:
            return resp.status, raw, resp.headers


def query_value(header_value: str) -> str:
    """What a webhook sender would put in ?authorization=: the token without its scheme."""
    return header_value[len("Bearer "):] if header_value.startswith("Bearer ") else header_value


async def try_three_ways(gw: Clients, value: str, valid: str) -> list[tuple[str, str]]:
    """[(transport, outcome)] with outcome "401", "UNAUTHENTICATED", or what was answered instead."""
    out = []
    status, body, headers = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": value})
    ok = status == 401 and is_unauthorized(body) and headers.get("WWW-Authenticate", "").startswith("Bearer")
    out.append(("REST header", "401" if ok else f"{status} {body!r}"))
    if query_value(value) != valid:  # the bare real token is the valid query form, not a hostile one
        status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization?authorization=" +
                                     quote(query_value(value), safe=""), {})
        out.append(("REST query", "401" if status == 401 and is_unauthorized(body) else f"{status} {body!r}"))
    try:
        await gw.monitoring.GetResourcesUtilization(monitoring_pb2.GetResourcesUtilizationRequest(),
                                                    metadata=(("authorization", value),))
        out.append(("gRPC", "accepted"))
    except grpc.aio.AioRpcError as exc:
        out.append(("gRPC", exc.code().name if exc.code() != grpc.StatusCode.UNAUTHENTICATED else "UNAUTHENTICATED"))
    return out


async def test_the_real_token_is_accepted_three_ways(gw: Clients, issued: dict[str, Any]) -> None:
    access = issued["jwt"]
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"Bearer {access}"})
    assert status == 200, body
    status, body, _ = await _get(gw, f"/monitoring/getResourcesUtilization?authorization={access}", {})
    assert status == 200, body
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"bearer {access}"})
    assert status == 200, body  # any one-word scheme, as the upstream: its second field is the token
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"Bearer: {access}"})
    assert status == 200, body  # Debezium's HTTP sink
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"bearer  {access}"})
    assert status == 401 and "Authorization" in body["reason"]  # the upstream's rule: exactly two fields
    reply = await gw.monitoring.GetResourcesUtilization(monitoring_pb2.GetResourcesUtilizationRequest(),
                                                        metadata=(("authorization", f"Bearer {access}"),))
    assert reply.storage >= 0


async def test_hostile_tokens_are_all_refused(gw: Clients, issued: dict[str, Any]) -> None:
    cases = hostile_cases(issued["jwt"], issued["jwt_refresh_token"])
    results = await asyncio.gather(*(try_three_ways(gw, value, issued["jwt"]) for value in cases.values()))
    accepted = {name: r for name, r in zip(cases, results, strict=True)
                if any(outcome not in ("401", "UNAUTHENTICATED") for _, outcome in r)}
    tried = sum(len(r) for r in results)
    refused = sum(1 for r in results for _, outcome in r if outcome in ("401", "UNAUTHENTICATED"))
    print(f"\nFIGURES hostile tokens: {len(cases)} cases over REST header, REST ?authorization= and gRPC "
          f"metadata = {tried} attempts, {refused} refused "
          f"(401 / UNAUTHENTICATED), {tried - refused} accepted")
    assert not accepted, accepted


async def test_garbage_query_token_beside_a_valid_header_and_the_reverse(gw: Clients, issued: dict[str, Any]) -> None:
    """The header, when present, is the credential: a bad header is not rescued by a good query token."""
    access = issued["jwt"]
    status, body, _ = await _get(gw, f"/monitoring/getResourcesUtilization?authorization={access}",
                                 {"Authorization": "Bearer garbage"})
    assert status == 401 and is_unauthorized(body)
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization?authorization=garbage",
                                 {"Authorization": f"Bearer {access}"})
    assert status == 200
    for query in ("?authorization=", "?authorization", "?authorization=Bearer%20" + access,
                  f"?authorization=garbage&authorization={access}"):
        status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization" + query, {})
        assert status == 401 and is_unauthorized(body), query


async def test_non_utf8_and_control_bytes_in_the_header(gw: Clients) -> None:
    """Bytes no HTTP client library would send, over a raw socket: 401 or 400, never a 5xx."""
    url = urlsplit(gw.base)
    outcomes = []
    for value in (b"Bearer caf\xe9", b"Bearer \xff\xfe", b"Bearer a\x01b", b"\xe9\xe9", b"Bearer eyJ\x7f.x.y"):
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"GET /monitoring/getResourcesUtilization HTTP/1.1\r\nHost: x\r\nAuthorization: " + value +
                     b"\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = int(raw.split(b" ", 2)[1])
        outcomes.append(status)
        assert status in (400, 401), raw
        assert b"Traceback" not in raw
    print(f"\nFIGURES raw-byte Authorization headers: {len(outcomes)} sent, statuses {sorted(set(outcomes))}")


async def test_access_token_used_to_refresh(gw: Clients, issued: dict[str, Any]) -> None:
    access, refresh = issued["jwt"], issued["jwt_refresh_token"]
    hostile = {
        "access token": access,
        "alg none refresh": unsigned({"alg": "none"}, claims_of(refresh)),
        "refresh with another key": jwt.encode(claims_of(refresh), "k" * 48, algorithm="HS256"),
        "expired refresh (real key)": forged(claims_of(refresh), exp=int(time.time()) - 5),
        "tampered refresh sub": tamper(refresh, sub="admin"),
        "access tampered to refresh": tamper(access, typ="refresh"),
        "garbage": "garbage", "empty": "", "Bearer prefix": f"Bearer {refresh}",
    }  # fmt: skip
    refused = 0
    for name, value in hostile.items():
        status, body, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": value})
        assert status == 401 and is_unauthorized(body), name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=value))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        refused += 2
    # the real refresh token still works, and what it returns is a new access token
    status, body, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": refresh})
    assert status == 200 and claims_of(body["jwt"])["typ"] == "access"
    print(f"\nFIGURES refresh endpoint: {len(hostile)} hostile refresh tokens x 2 protocols, {refused} refused")


async def test_a_cached_token_expires_on_time(gw: Clients, issued: dict[str, Any]) -> None:
    """A verified token is cached (tokens.py); the cache must not outlive the token's exp."""
    token = forged(claims_of(issued["jwt"]), exp=int(time.time()) + 2, jti=uuid.uuid4().hex)
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"Bearer {token}"})
    assert status == 200, body  # now verified and cached
    await asyncio.sleep(max(0.0, claims_of(token)["exp"] - time.time()) + 0.3)
    status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"Bearer {token}"})
    assert status == 401 and is_unauthorized(body)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(station="s"),
                                       metadata=(("authorization", f"Bearer {token}"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_short_lived_token_issued_for_real_expires(gw: Clients) -> None:
    """A 1-minute token, one minute later (the gateway's clock moved forward, pyjwt's with it)."""
    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD,
                                                           "token_expiry_in_minutes": 1})
    assert status == 200 and body["expires_in"] == 60000
    token = body["jwt"]
    status, _, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"Bearer {token}"})
    assert status == 200
    real_time = time.time
    with pytest.MonkeyPatch.context() as mp:  # time travel: +61 s for the token cache and for pyjwt
        mp.setattr(time, "time", lambda: real_time() + 61)
        mp.setattr(jwt.api_jwt, "datetime", _Later)
        status, body, _ = await _get(gw, "/monitoring/getResourcesUtilization", {"Authorization": f"Bearer {token}"})
    assert status == 401 and is_unauthorized(body)


class _Later(datetime.datetime):
    """pyjwt's ``datetime``, 61 s ahead (it reads ``datetime.now(tz=timezone.utc)``)."""

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
        return datetime.datetime.now(tz) + datetime.timedelta(seconds=61)
