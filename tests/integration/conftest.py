"""Fixtures of the integration tier: one gateway per module on the module's nats-server (tests/conftest.py).

A module that needs other settings defines its own ``gw``; it overrides this one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness import Clients, running_gateway, settings_for


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clients]:  # type: ignore[no-untyped-def]
    """An in-process gateway on real loopback sockets, with REST and gRPC clients."""
    async with running_gateway(settings_for(nats_server.url, tmp_path_factory.mktemp("gw"))) as clients:
        yield clients


@pytest.fixture(scope="module")
async def token(gw: Clients) -> str:
    """A root access token (REST authenticate)."""
    return await gw.rest_token()
