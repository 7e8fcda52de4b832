"""No secret in any log line, at any level, nor on stdout/stderr.

Every log record (root logger at DEBUG, every library included) and everything written to the
process's file descriptors 1 and 2 (nats-py, memphis-py, grpc's C core) is captured during a
whole session against a real nats-server: start-up, authenticate and refresh over both protocols,
produce (token in the header and in ``?authorization=``, cookies, proxy credentials), consume,
streams, a failed login (wrong password), a login with a connection token the broker refuses,
401s with near-valid tokens, and shutdown. The password, the wrong password, the connection
token, the JWT secret and every token issued (payload and signature segments) must appear nowhere,
exception texts included.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Any

import grpc
import pytest
from memgw.v1 import auth_pb2, consume_pb2, produce_pb2

from tests.harness import (
    JWT_SECRET,
    ROOT_PASSWORD,
    ROOT_USER,
    Clients,
    bearer,
    is_unauthorized,
    running_gateway,
    settings_for,
)


class Collect(logging.Handler):
    """Every record, formatted with its exception and stack text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[tuple[str, str]] = []  # (level, text)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # a record that cannot be formatted is still looked at
            text = f"{record.msg!r} {record.args!r} ({exc})"
        self.lines.append((record.levelname, f"{text}\n{record.args!r}"))


async def expect_error(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def session(gw: Clients, secrets: list[str]) -> None:
    """Everything a client does in a day, good and bad; what must stay secret goes into ``secrets``."""
    wrong_password = f"Wr0ng-pw-{uuid.uuid4().hex}"
    connection_token = f"tok-{uuid.uuid4().hex}"
    cookie, proxy = f"s3ss-{uuid.uuid4().hex}", f"pr0xy-{uuid.uuid4().hex}"
    secrets += [wrong_password, connection_token, cookie, proxy]
    station = f"sec-{uuid.uuid4().hex[:8]}"

    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
    assert status == 200
    access, refresh = body["jwt"], body["jwt_refresh_token"]
    status, body, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": refresh})
    assert status == 200
    reply = await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=f"{ROOT_USER}$1", password=ROOT_PASSWORD))
    again = await gw.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=reply.jwt_refresh_token))
    tokens = [access, refresh, body["jwt"], body["jwt_refresh_token"], reply.jwt, reply.jwt_refresh_token,
              again.jwt, again.jwt_refresh_token]
    for token in tokens:  # the header segment is the same for every HS256 JWT: the others are the secret
        secrets += token.split(".")[1:]

    headers = {"Content-Type": "text/plain", "Cookie": f"session={cookie}", "Proxy-Authorization": f"Basic {proxy}"}
    assert (await gw.post(f"/stations/{station}/produce/single", raw=b"one", token=access, headers=headers))[0] == 200
    status, _, _ = await gw.post(f"/stations/{station}/produce/batch?authorization={access}", [1, 2],
                                 headers={"Cookie": f"session={cookie}"})
    assert status == 200
    await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=station, body={"content_type": "text/plain", "data": b"g"}, headers={"Cookie": cookie}),
        metadata=bearer(reply.jwt))
    status, got, _ = await gw.post(f"/stations/{station}/consume/batch",
                                   {"consumer_name": "c", "batch_size": 4, "batch_max_wait_time_ms": 500}, token=access)
    assert status == 200 and len(got) == 4
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(station=station, consumer_name="s", consumer_group="sg",
                                                             batch_size=1),
                                metadata=bearer(reply.jwt))
    await asyncio.wait_for(call.read(), 5)
    call.cancel()
    async with gw.http.post(f"{gw.base}/stations/{station}/consume/stream",
                            json={"consumer_name": "r", "consumer_group": "rg", "batch_size": 1},
                            headers={"Authorization": f"Bearer {access}"}) as resp:
        await asyncio.wait_for(resp.content.readline(), 5)

    # failures: wrong password, a connection token the broker refuses, near-valid and refresh tokens
    status, _, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": wrong_password})
    assert status == 401
    assert await expect_error(gw.auth.Authenticate(auth_pb2.AuthenticateRequest(
        username=ROOT_USER, password=wrong_password))) == grpc.StatusCode.UNAUTHENTICATED
    # (401 is right; memphis_adapter answers 503 after broker_timeout_s: see test_refused_connection_token_is_401)
    status, _, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "connection_token": connection_token})
    assert status in (401, 503)
    assert await expect_error(gw.auth.Authenticate(auth_pb2.AuthenticateRequest(
        username=ROOT_USER, connection_token=connection_token))) in (grpc.StatusCode.UNAUTHENTICATED,
                                                                    grpc.StatusCode.UNAVAILABLE)
    near = access[:-2] + ("AA" if not access.endswith("AA") else "BB")
    secrets.append(near.split(".")[2])
    for token in (near, refresh):
        status, _, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"x", token=token,
                                     headers={"Content-Type": "text/plain"})
        assert status == 401
        assert await expect_error(gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(station=station),
                                                           metadata=bearer(token))) == grpc.StatusCode.UNAUTHENTICATED
    status, _, _ = await gw.post(f"/stations/{station}/produce/single?authorization={near}", raw=b"x",
                                 headers={"Content-Type": "text/plain"})
    assert status == 401
    status, _, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": access})
    assert status == 401
    # a client error in the middle of a JSON body that holds the password
    status, _, _ = await gw.post("/auth/authenticate", raw=b'{"username": "root", "password": "' +
                                 ROOT_PASSWORD.encode() + b'", "account_id": "x"}',
                                 headers={"Content-Type": "application/json"})
    assert status == 400


async def test_no_secret_in_logs_or_output(nats_server, tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    collect = Collect()
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in [*logging.root.manager.loggerDict, ""]}
    root.addHandler(collect)
    for name in levels:  # every logger at DEBUG, whatever a library or an earlier test set
        logging.getLogger(name).setLevel(logging.DEBUG)
    secrets = [ROOT_PASSWORD, JWT_SECRET]
    canary = f"canary-{uuid.uuid4().hex}"
    try:
        async with running_gateway(settings_for(nats_server.url, tmp_path, log_level="DEBUG",
                                                broker_timeout_s=1.5)) as gw:
            await session(gw, secrets)
            logging.getLogger("some.library").debug("canary %s", canary)  # proves the capture sees DEBUG
    finally:
        root.removeHandler(collect)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    out, err = capfd.readouterr()
    texts = [*(text for _, text in collect.lines), out, err]
    found = {s[:12] + "...": [t[:200] for t in texts if s in t][:2] for s in secrets if any(s in t for t in texts)}
    per_level = Counter(level for level, _ in collect.lines)
    print(f"\nFIGURES log secrets: {len(collect.lines)} log records ({dict(per_level)}), "
          f"{len(out) + len(err)} bytes of stdout/stderr, {len(secrets)} secrets looked for, {len(found)} found")
    assert len(collect.lines) > 20 and any(canary in t for t in texts)  # the capture works
    assert not found, found


async def test_refused_connection_token_is_401(nats_server, tmp_path) -> None:
    async with running_gateway(settings_for(nats_server.url, tmp_path, broker_timeout_s=1.0)) as gw:
        status, body, _ = await gw.post("/auth/authenticate",
                                        {"username": ROOT_USER, "connection_token": f"tok-{uuid.uuid4().hex}"})
        assert status == 401 and is_unauthorized(body), body
