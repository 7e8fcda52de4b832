"""ProduceService.ProduceStream when frames fail: every task's exception read, none left running."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from memgw.v1 import produce_pb2

from gateway.broker.seam import OutMessage
from gateway.core.errors import Unavailable
from gateway.core.identity import Credentials, Principal
from gateway.rpc.call import CallContext
from gateway.servicers.produce import ProduceService


class FakeBroker:
    def __init__(self) -> None:
        self.running = 0
        self.finished: list[str] = []

    async def produce(self, creds: Credentials, station: str, messages: Sequence[OutMessage],
                      producer_name: str = "") -> list[str | None]:
        self.running += 1
        try:
            if station.startswith("fail"):
                raise Unavailable(f"broker unavailable ({station})")
            await asyncio.sleep(5)
            return [None] * len(messages)
        finally:
            self.running -= 1
            self.finished.append(station)


async def frames(stations: list[str]) -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
    for station in stations:
        yield produce_pb2.ProduceStreamRequest(station=station, messages=[produce_pb2.ProducedMessage(data=b"x")])
        await asyncio.sleep(0)


async def test_a_failing_frame_leaves_no_task_running_and_no_exception_unretrieved() -> None:
    broker = FakeBroker()
    service = ProduceService(broker, 100)  # type: ignore[arg-type]
    ctx = CallContext(protocol="grpc", metadata={},
                      principal=Principal(credentials=Credentials(username="u", account_id=1, password="p")),
                      authorizer=lambda action, station: None)  # admission allowed every station
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    with pytest.raises(Unavailable):
        await service.ProduceStream(frames(["slow-1", "fail-1", "fail-2", "slow-2", "slow-3", "slow-4"]), ctx)
    running_after = broker.running
    gc.collect()
    await asyncio.sleep(0.05)
    gc.collect()
    loop.set_exception_handler(None)
    print(f"\nafter the failure: {running_after} frames still running, {len(unretrieved)} exceptions never retrieved")
    assert running_after == 0
    assert not [c for c in unretrieved if "never retrieved" in str(c.get("message"))]
