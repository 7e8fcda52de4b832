"""Attacks on authentication and identity, over REST and gRPC, against a real nats-server.

- password guessing: failed logins throttled per username and per client address (429 +
  Retry-After / RESOURCE_EXHAUSTED), the real user waits seconds, not a lock-out; a failed login
  leaves nothing in the session pool;
- ``user$N``: every account id the broker maps to the same user is one identity (one session, one
  stream quota); absurd account ids are 400;
- an outage never tells an anonymous caller the broker's address.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from memgw.v1 import auth_pb2, consume_pb2

from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer, jwt_payload, running_gateway, settings_for

PER_USER = 30  # failed logins a minute per username: 30 in a row, then one every 2 s
PER_ADDRESS = 12


@pytest.fixture(scope="module")
async def throttled(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("gw"), login_failures_per_user_per_min=PER_USER,
                            login_failures_per_address_per_min=100_000)
    async with running_gateway(settings) as clients:
        yield clients


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("gw"), max_streams_per_user=1)
    async with running_gateway(settings) as clients:
        yield clients


async def grpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def rest_login(gw: Clients, username: str, password: str, **extra: Any) -> tuple[int, Any, Any]:
    return await gw.post("/auth/authenticate", {"username": username, "password": password, **extra})


async def grpc_login(gw: Clients, username: str, password: str) -> grpc.StatusCode:
    try:
        await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=username, password=password))
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# -- 1. password guessing ------------------------------------------------------------------


async def test_password_guessing_is_throttled_per_user_and_the_user_waits_seconds(throttled: Clients) -> None:
    gw = throttled
    started = time.monotonic()
    results = await asyncio.gather(*(rest_login(gw, ROOT_USER, f"guess-{i}") for i in range(3 * PER_USER)))
    took = time.monotonic() - started
    statuses = Counter(status for status, _, _ in results)
    print(f"\n{3 * PER_USER} concurrent wrong passwords for {ROOT_USER!r} in {took:.2f} s: {dict(statuses)}")
    assert set(statuses) == {401, 429}
    assert statuses[401] <= PER_USER + 1  # the bucket refills a little while they run
    refused = [(body, headers) for status, body, headers in results if status == 429]
    body, headers = refused[0]
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 60 / PER_USER + 1
    assert "too many failed logins" in json.dumps(body)
    # the real user: locked out for Retry-After seconds at most, not for long
    await asyncio.sleep(retry_after)
    status, body, _ = await rest_login(gw, ROOT_USER, ROOT_PASSWORD)
    assert status == 200, body
    print(f"the real user logs in again after {retry_after} s")
    # the pool keeps nothing of the failures
    assert not gw.gateway.broker._pool._connecting


async def test_password_guessing_over_grpc_is_throttled(throttled: Clients) -> None:
    gw = throttled
    codes = Counter(await asyncio.gather(*(grpc_login(gw, "grpc-victim", f"g-{i}") for i in range(2 * PER_USER))))
    print(f"\n{2 * PER_USER} wrong gRPC logins: {dict(codes)}")
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= PER_USER - 1
    assert codes[grpc.StatusCode.UNAUTHENTICATED] <= PER_USER + 1
    call = gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username="grpc-victim", password="again"))
    err = await grpc_error(call)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(await call.initial_metadata()).get("retry-after")


async def test_failures_are_throttled_per_address_across_usernames_and_protocols(nats_server, tmp_path) -> None:
    settings = settings_for(nats_server.url, tmp_path, login_failures_per_user_per_min=100_000,
                            login_failures_per_address_per_min=PER_ADDRESS)
    async with running_gateway(settings) as gw:
        statuses = [(await rest_login(gw, f"user-{i}", "x"))[0] for i in range(PER_ADDRESS)]
        assert set(statuses) == {401}
        assert (await rest_login(gw, "someone-else", "x"))[0] == 429
        assert await grpc_login(gw, "and-another", "x") == grpc.StatusCode.RESOURCE_EXHAUSTED  # same address


async def test_failed_logins_leave_nothing_behind(nats_server, tmp_path) -> None:
    settings = settings_for(nats_server.url, tmp_path, login_failures_per_user_per_min=0,
                            login_failures_per_address_per_min=0)
    async with running_gateway(settings) as gw:
        pool = gw.gateway.broker._pool
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.monotonic()
        n = 0
        for _ in range(3):
            statuses = await asyncio.gather(*(rest_login(gw, ROOT_USER, f"w-{n + i}") for i in range(100)))
            n += 100
            assert {s for s, _, _ in statuses} == {401}
        print(f"\n{n} failed logins (throttling off) in {time.monotonic() - started:.1f} s: "
              f"{len(pool._connecting)} connect locks left, {len(pool._sessions)} sessions, "
              f"max RSS +{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024:.1f} MB")
        assert not pool._connecting and not pool._sessions


# -- 2. user$N is the user the broker accepted ----------------------------------------------


async def test_user_dollar_n_is_one_identity(gw: Clients) -> None:
    tokens = []
    for n in range(2, 8):
        status, body, _ = await rest_login(gw, f"{ROOT_USER}${n}", ROOT_PASSWORD)
        assert status == 200, body
        assert json.loads(jwt_payload(body["jwt"]))["acc"] == 1  # the broker let root$N in as root
        tokens.append(body["jwt"])
    reply = await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER, password=ROOT_PASSWORD,
                                                                    account_id=9))
    assert json.loads(jwt_payload(reply.jwt))["acc"] == 1
    tokens.append(reply.jwt)
    for first in range(10, 110, 5):  # a login is reserved as a failure until it succeeds: 5 at a time
        many = await asyncio.gather(*(rest_login(gw, f"{ROOT_USER}${n}", ROOT_PASSWORD)
                                      for n in range(first, first + 5)))
        assert {s for s, _, _ in many} == {200}
    sessions = gw.gateway.broker.sessions()
    print(f"\n107 logins as {ROOT_USER}$2..{ROOT_USER}$109: {len(sessions)} broker session(s)")
    assert len(sessions) == 1
    # one stream quota (max_streams_per_user=1) whatever account id the token was asked with
    sub = gw.consume.Subscribe(consume_pb2.SubscribeRequest(station="ident-st", consumer_name="c1"),
                               metadata=bearer(tokens[0]))
    try:
        await asyncio.sleep(0.5)
        err = await grpc_error(_second_stream(gw, tokens[-1]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status, _, _ = await gw.post("/stations/ident-st/consume/stream", {"consumer_name": "c3"}, token=tokens[3])
        assert status == 429
    finally:
        sub.cancel()


async def _second_stream(gw: Clients, token: str) -> None:
    async for _ in gw.consume.Subscribe(consume_pb2.SubscribeRequest(station="ident-st", consumer_name="c2"),
                                        metadata=bearer(token)):
        break


@pytest.mark.parametrize("username, extra", [
    (f"{ROOT_USER}$99999999999999999999", {}),
    (f"{ROOT_USER}$2147483648", {}),
    (f"{ROOT_USER}$" + "9" * 5000, {}),
    (ROOT_USER, {"account_id": 3_000_000_000}),
])
async def test_absurd_account_ids_are_400(gw: Clients, username: str, extra: dict[str, Any]) -> None:
    status, body, _ = await rest_login(gw, username, ROOT_PASSWORD, **extra)
    assert status == 400, body
    assert "account_id" in json.dumps(body)
    request = auth_pb2.AuthenticateRequest(username=username, password=ROOT_PASSWORD, **extra)
    err = await grpc_error(gw.auth.Authenticate(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- 5. an outage does not reveal the broker's address ----------------------------------------


async def test_outage_does_not_reveal_the_broker_address(tmp_path, caplog) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = settings_for(f"127.0.0.1:{port}", tmp_path, control_plane=False, broker_timeout_s=1.0)
    async with running_gateway(settings) as gw:
        status, body, headers = await rest_login(gw, ROOT_USER, ROOT_PASSWORD)
        assert status == 503 and "Retry-After" in headers
        err = await grpc_error(gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER,
                                                                                   password=ROOT_PASSWORD)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        print(f"\nduring an outage: REST {status} {body}; gRPC {err.details()!r}")
        for text in (json.dumps(body), err.details()):
            assert "127.0.0.1" not in text and str(port) not in text
            assert "broker unavailable" in text
        assert f"127.0.0.1:{port}" in caplog.text  # the operator's log has it
