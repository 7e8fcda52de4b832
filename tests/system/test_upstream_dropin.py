"""Drop-in for real: a gateway configured ONLY with the upstream's variable names, in front of a separate
broker, answers the upstream's documented requests as the upstream does.

The broker: a nats-server started here with our control plane (the role a Memphis broker plays), on a
free port; ``MEMPHIS_HOST`` carries ``host:port`` (upstream appends ``:6666`` to a bare host; a bare host
means 6666 here too, docs/upstream.md "The variables"). The gateway process gets the upstream's names
only (helm's password mode: ``USER_PASS_BASED_AUTH=true``, distinct ``JWT_SECRET`` and
``REFRESH_JWT_SECRET``), plus ``MEMPHIS_GATEWAY_GRPC_PORT`` because the upstream has no gRPC listener
and the default 50051 may be taken on a shared machine.

The requests: tests/system/upstream/requests.json (the upstream's README, the Memphis docs' quick
start and hello world, the Memphis console's snippets, Debezium Server's HTTP sink, and the
upstream's code; each entry cites its source), replayed literally by tests/system/upstream/replay.py;
``{UPSTREAM_JWT}``, ``{UPSTREAM_REFRESH}`` and ``{LEGACY_JWT}`` are minted as the upstream mints them.
Entries marked ``deliberate_difference`` are compared on their ``still_compare`` keys only (README,
"Deliberate differences from the upstream gateway").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.embedded.server import EmbeddedBroker
from tests.conftest import connect_root
from tests.system.upstream.replay import Values, check, load, replay, upstream_tokens

ROOT_PASSWORD = "T3st-pw-7c1e9f"
JWT_SECRET = "JWT_TEST_PURPOSE"  # the compose's value: 16 bytes, accepted with a warning
REFRESH_JWT_SECRET = "REFRESH_JWT_TEST_PURPOSE"

pytestmark = pytest.mark.timeout(120)


class MemphisLikeBroker(EmbeddedBroker):
    """Users only as ``<name>$1``, as an open-source Memphis broker defines them (docs/upstream.md, "Broker
    connections"): another account id is refused, which the README's Cloud examples (account 123456789) rely on."""

    def config(self) -> dict[str, object]:
        conf = super().config()
        for account in conf["accounts"].values():  # type: ignore[attr-defined]
            account["users"] = [u for u in account["users"] if u["user"].endswith("$1")]
        return conf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gateway did not start")


def upstream_env(http_port: int, broker_port: int, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMPHIS_GATEWAY_")}
    env.update(
        HTTP_PORT=str(http_port),
        MEMPHIS_HOST=f"127.0.0.1:{broker_port}",
        USER_PASS_BASED_AUTH="true",
        ROOT_USER="root",
        ROOT_PASSWORD=ROOT_PASSWORD,
        CONNECTION_TOKEN="memphis",
        JWT_SECRET=JWT_SECRET,
        REFRESH_JWT_SECRET=REFRESH_JWT_SECRET,
        MEMPHIS_GATEWAY_GRPC_PORT=str(free_port()),  # the upstream has no gRPC listener
        **more,
    )
    return env


async def test_documented_requests_answer_as_upstream(tmp_path: Path) -> None:
    broker = MemphisLikeBroker(data_dir=tmp_path / "broker", port=0, root_password=ROOT_PASSWORD)
    await broker.start()
    from gateway.embedded.controlplane import ControlPlane

    nc = await connect_root(broker, name="tests::memphis-broker")
    plane = ControlPlane()
    await plane.start(nc)
    http = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=upstream_env(http, broker.port),  # noqa: ASYNC220
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_up(f"http://127.0.0.1:{http}/monitoring/status", proc)
        values = Values(user="root", password=ROOT_PASSWORD, jwt_secret=JWT_SECRET,
                        refresh_jwt_secret=REFRESH_JWT_SECRET)
        entries = load()
        results = await replay(f"http://127.0.0.1:{http}", values, entries)
        failing = {e["id"]: problems for e, r in zip(entries, results, strict=True) if (problems := check(e, r))}
        assert not failing, "\n".join(f"{k}: {v}" for k, v in failing.items())
        assert len(entries) >= 43
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await plane.stop()
        await nc.close()
        await broker.stop()
    log = proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    # the start-up log names the variables it read, and never prints a secret
    assert "upstream variables HTTP_PORT, MEMPHIS_HOST, USER_PASS_BASED_AUTH" in log
    assert "broker: external" in log and "embedded nats-server" not in log
    assert "jwt_secret is only 16 characters" in log
    for secret in (ROOT_PASSWORD, JWT_SECRET, REFRESH_JWT_SECRET):
        assert secret not in log.replace("jwt_secret is only", "")


def test_upstream_token_helper_is_used() -> None:
    """The minted tokens carry the upstream's claims (docs/upstream.md, "Claims, exactly")."""
    import jwt

    tokens = upstream_tokens(Values(user="u", password="p", jwt_secret="a" * 40, refresh_jwt_secret="b" * 40))
    claims = jwt.decode(tokens["UPSTREAM_JWT"], "a" * 40, algorithms=["HS256"])
    assert set(claims) == {"username", "password", "account_id", "exp", "connection_token"}
