"""Issue 10, medium and low items that a black-box test can reach.

* During a broker outage ``/auth/authenticate`` told anonymous callers the broker's address.
* Refresh tokens never rotated: a stolen one stays good for its whole life.
* Secrets only as flags (``--root-password``, ``--jwt-secret``): visible in ``ps``; accept them from
  files (``MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE``, ``MEMPHIS_GATEWAY_JWT_SECRET_FILE``).
* A pre-existing broker config file (it holds passwords) kept its 0644.

Not here: the development password on a non-loopback ``--host`` (testing it would bind a
non-loopback address), the control plane acting with root's rights (needs a broker user with
restricted permissions), stations re-created behind the gateway's back, and the per-user station
quota (its size is a design decision still to make).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import aiohttp
import pytest

from gateway.embedded.server import EmbeddedBroker
from tests.system.security.conftest import (
    JWT_SECRET,
    ROOT_PASSWORD,
    Api,
    GatewayProcess,
    figure,
)


async def test_refresh_tokens_rotate_and_are_single_use(api: Api, gw: GatewayProcess) -> None:
    status, body, _ = await api.post("/auth/authenticate", json_body={"username": "root", "password": ROOT_PASSWORD})
    assert status == 200
    first = body["jwt_refresh_token"]
    await asyncio.sleep(1.1)  # a new iat, so a rotated token differs even if nothing else does
    status1, body1, _ = await api.post("/auth/refreshToken", json_body={"jwt_refresh_token": first})
    status2, _, _ = await api.post("/auth/refreshToken", json_body={"jwt_refresh_token": first})
    rotated = status1 == 200 and body1.get("jwt_refresh_token") not in (None, first)
    figure("refresh-reuse", f"refresh: {status1} (rotated {rotated}); the same refresh token again: {status2}",
           first=status1, reuse=status2, rotated=rotated)
    assert status1 == 200 and rotated
    assert status2 == 401


@pytest.mark.timeout(90)
async def test_secrets_from_files_keep_them_out_of_ps(broker: EmbeddedBroker, tmp_path: Path) -> None:
    pw_file, jwt_file = tmp_path / "root-password", tmp_path / "jwt-secret"
    pw_file.write_text(ROOT_PASSWORD + "\n")
    jwt_file.write_text(JWT_SECRET + "\n")
    for f in (pw_file, jwt_file):
        f.chmod(0o600)
    gw = GatewayProcess(broker.url, tmp_path, [], secrets_in_argv=False, env={
        "MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE": str(pw_file), "MEMPHIS_GATEWAY_JWT_SECRET_FILE": str(jwt_file)})
    started, status, leaked = None, None, None
    try:
        await gw.start(timeout_s=15)
        started = True
        leaked = any(ROOT_PASSWORD in part or JWT_SECRET in part for part in gw.process.cmdline())
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.base + "/auth/authenticate",
                                 json={"username": "root", "password": ROOT_PASSWORD}) as resp:
                status = resp.status
                # the control plane connected with the file's password: a produce creates a station
                token = (await resp.json()).get("jwt") if status == 200 else None
            if token:
                async with http.post(gw.base + "/stations/from-files/produce/single", data="x",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "text/plain"}) as resp:
                    status = resp.status
    except RuntimeError as exc:
        started = f"did not start: {str(exc)[-150:]!r}"
    finally:
        await gw.stop()
    figure("secrets-from-files", f"*_FILE variables: started {started}, authenticate+produce {status}, "
           f"secret in ps {leaked}", started=str(started), status=status, leaked=leaked)
    assert started is True
    assert status == 200
    assert leaked is False


@pytest.mark.timeout(90)
async def test_existing_broker_config_gets_private_permissions(tmp_path: Path) -> None:
    """The embedded broker's config holds passwords: a 0644 copy left from before is made 0600."""
    gw = GatewayProcess(None, tmp_path, [])
    config = tmp_path / "gw" / "nats-server.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"placeholder": True}))
    config.chmod(0o644)
    try:
        await gw.start()
        mode = stat.S_IMODE(os.stat(config).st_mode)
        readable = [p.name for p in (tmp_path / "gw").iterdir() if p.is_file()
                    and stat.S_IMODE(p.stat().st_mode) & 0o077 and ROOT_PASSWORD in p.read_text(errors="ignore")]
    finally:
        await gw.stop()
    figure("config-permissions", f"pre-existing 0644 nats-server.json after start: {oct(mode)}; other readable "
           f"files holding the password: {readable}", mode=oct(mode), readable=readable)
    assert mode & 0o077 == 0
    assert not readable


@pytest.mark.timeout(90)
async def test_outage_does_not_tell_anonymous_callers_the_broker_address(api: Api, gw: GatewayProcess,
                                                                         broker: EmbeddedBroker) -> None:
    """Last in the module: it stops the broker (and starts it again)."""
    port = broker.url.rsplit(":", 1)[1]
    broker.kill()
    try:
        await asyncio.sleep(0.5)
        status, body, _ = await api.post("/auth/authenticate",
                                         json_body={"username": "root$3", "password": ROOT_PASSWORD})
        health, health_body, _ = await api.request("GET", "/monitoring/status")
    finally:
        await broker.start()
    text = json.dumps(body) if not isinstance(body, bytes) else body.decode(errors="replace")
    leaks = [s for s in ("127.0.0.1", f":{port}", port) if s in text]
    figure("outage-address", f"authenticate during an outage: {status} {text[:120]!r}; leaks {leaks}; "
           f"(/monitoring/status {health} {str(health_body)[:80]!r})", status=status, leaks=leaks)
    assert status == 503
    assert not leaks, text
