"""``--workers N``: one scrape of ``/metrics`` shows the whole gateway, whichever worker it reaches.

Every worker subscribes to one NATS subject of its worker group (not a queue group: all of
them answer) on its service connection. A scrape publishes one request there and sums the
snapshots that come back within ``wait_s`` with its own (``Metrics.exposition(others=...)``).
A worker that does not answer in time is missing from that scrape, never blocking it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import orjson

from gateway.rpc.metrics import Metrics, Snapshot

log = logging.getLogger("gateway.metrics")
SUBJECT = "_memgw.metrics.{group}"


class MetricsShare:
    def __init__(self, metrics: Metrics, nc: Any, group: str, workers: int, wait_s: float = 0.3) -> None:
        self._metrics = metrics
        self._nc = nc
        self._subject = SUBJECT.format(group=group)
        self._others = workers - 1
        self._wait = wait_s
        self._id = f"{os.getpid()}"
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._subject, cb=self._answer)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection may be gone already
                pass

    async def _answer(self, msg: Any) -> None:
        if msg.reply and msg.data != self._id.encode():  # not our own scrape
            await self._nc.publish(msg.reply, orjson.dumps(self._metrics.snapshot()))

    async def gather(self) -> list[Snapshot]:
        """The other workers' snapshots (those that answer within ``wait_s``)."""
        if self._others <= 0 or not self._nc.is_connected:
            return []
        got: list[Snapshot] = []
        done = asyncio.get_running_loop().create_future()

        async def on_reply(msg: Any) -> None:
            try:
                got.append(orjson.loads(msg.data))
            except orjson.JSONDecodeError:
                return
            if len(got) >= self._others and not done.done():
                done.set_result(None)

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=on_reply)
        try:
            await self._nc.publish(self._subject, self._id.encode(), reply=inbox)
            await asyncio.wait((done,), timeout=self._wait)
        finally:
            await sub.unsubscribe()
        if len(got) < self._others:
            log.warning("metrics: %d of %d other workers answered within %g s", len(got), self._others, self._wait)
        return got
