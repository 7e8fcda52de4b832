"""Shared fixtures: a real nats-server per test module, and our control plane on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from gateway.embedded.controlplane import ControlPlane
from gateway.embedded.server import EmbeddedBroker

ROOT_USER, ROOT_PASSWORD = "root", "T3st-pw-7c1e9f"  # distinctive: tests look for it in tokens and logs


@pytest.fixture(scope="module")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedBroker]:
    """A started ``EmbeddedBroker`` on a free loopback port with a temporary store.

    Users ``root$1`` and ``root``, password ``ROOT_PASSWORD``. Tests may ``kill()`` and ``start()``
    it again: the port and the JetStream data are kept.
    """
    broker = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("nats"), port=0, root_password=ROOT_PASSWORD)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def connect_root(broker: EmbeddedBroker, **options: object) -> Client:
    """A nats-py client of the root user that keeps reconnecting (the broker may be restarted)."""

    async def quiet(_err: Exception) -> None:
        return None

    return await nats.connect(
        broker.url,
        user=f"{ROOT_USER}$1",
        password=ROOT_PASSWORD,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        error_cb=quiet,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
async def control_plane(nats_server: EmbeddedBroker) -> AsyncIterator[ControlPlane]:
    """A running ``ControlPlane`` on its own root connection (``control_plane.catalog`` for the API)."""
    nc = await connect_root(nats_server, name="tests::control-plane")
    plane = ControlPlane()
    await plane.start(nc)
    try:
        yield plane
    finally:
        await plane.stop()
        await nc.close()


_TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, the folder it lives in (``-m unit`` runs the fast ones)."""
    for item in items:
        parts = item.path.parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
                break
