"""The embedded broker's files: its configuration holds passwords, so 0600 on every start (files
that existed with wider permissions too) and a 0700 data directory; its account's JetStream limits."""

from __future__ import annotations

import stat
from pathlib import Path

import nats

from gateway.embedded.server import AccountLimits, EmbeddedBroker


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_config_owner_and_log_files_private_on_every_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = EmbeddedBroker(data_dir=data, port=0, root_password="pw-files-1",
                            limits=AccountLimits(max_streams=2))
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    for path in (broker.config_path, broker.owner_path, broker.log_path):  # left by an older version
        path.write_text("{}")
        path.chmod(0o644)
    before = {p.name: oct(mode(p)) for p in (data, broker.config_path, broker.owner_path, broker.log_path)}
    await broker.start()
    try:
        after = {p.name: oct(mode(p)) for p in (data, broker.config_path, broker.owner_path, broker.log_path)}
        print(f"\npermissions before the start {before}, after {after}")
        assert mode(data) == 0o700
        for path in (broker.config_path, broker.owner_path, broker.log_path):
            assert mode(path) == 0o600, path
        nc = await nats.connect(broker.url, user="root$1", password="pw-files-1")
        js = nc.jetstream()
        assert (await js.account_info()).limits.max_streams == 2
        await js.add_stream(name="a", subjects=["a.>"])
        await js.add_stream(name="b", subjects=["b.>"])
        try:
            await js.add_stream(name="c", subjects=["c.>"])
            raise AssertionError("a third stream was accepted")
        except nats.js.errors.BadRequestError as exc:
            assert "maximum number of streams" in str(exc)
        await nc.close()
    finally:
        await broker.stop()
