"""Deadlines: the gateway's one timeout mechanism.

Every call has a deadline and every publish an acknowledgement timeout, and nearly all of
them are met. With uvloop, arming and cancelling a loop timer costs about 2 us (a libuv
timer each), which is several percent of a small request. Here a deadline is an entry in
a bucket of ``RESOLUTION_S`` width, and one loop timer is armed for the earliest bucket
that holds anything: a deadline fires up to ``RESOLUTION_S`` late, never early. A busy
gateway ticks about every ``RESOLUTION_S``; 10,000 idle long polls whose deadlines lie a
minute ahead cost one timer a minute, not a sweep every 10 ms.

Two ways to use it: ``at(when, callback, arg)`` / ``cancel(handle)`` on the hot path, and
``async with deadlines().timeout(seconds):`` (like ``asyncio.timeout``) everywhere else.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

RESOLUTION_S = 0.01
log = logging.getLogger("gateway.deadlines")
Handle = tuple[int, int]  # (bucket, key)


class Deadlines:
    def __init__(self, resolution_s: float = RESOLUTION_S) -> None:
        self._resolution = resolution_s
        self._buckets: dict[int, dict[int, tuple[Callable[[Any], object], Any]]] = {}
        self._slots: list[int] = []  # heap of the buckets' slots (some may be gone: skipped when popped)
        self._count = 0
        self._fired = 0  # every bucket up to this one has fired
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._tick_slot = 0  # the slot the armed timer fires for

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, without ``asyncio.get_running_loop()``'s getpid() system call each time."""
        loop = self._loop
        if loop is None or not loop.is_running():
            running = asyncio.get_running_loop()
            if running is not loop:  # a new loop (tests run several): what the old one held is gone
                self._loop, self._buckets, self._slots, self._count, self._tick = running, {}, [], 0, None
            loop = running
        return loop

    def at(self, when: float, callback: Callable[[Any], object], arg: Any) -> Handle:
        """Call ``callback(arg)`` once ``time.monotonic()`` has passed ``when``; returns a handle for ``cancel``."""
        loop = self.loop()
        if self._tick is None and not self._count:
            self._fired = int(time.monotonic() / self._resolution)
        slot = max(int(when / self._resolution) + 1, self._fired + 1)  # +1: never early
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = {}
            heapq.heappush(self._slots, slot)
            if self._tick is None or slot < self._tick_slot:  # the earliest bucket: (re)arm for it
                if self._tick is not None:
                    self._tick.cancel()
                self._arm(loop, slot)
        key = next(self._keys)
        bucket[key] = (callback, arg)
        self._count += 1
        return slot, key

    def cancel(self, handle: Handle) -> None:
        bucket = self._buckets.get(handle[0])
        if bucket is not None and bucket.pop(handle[1], None) is not None:
            self._count -= 1
            if not bucket:
                del self._buckets[handle[0]]

    def __len__(self) -> int:
        return self._count

    def timeout(self, seconds: float) -> Timeout:
        """``async with deadlines().timeout(s):`` raises TimeoutError when the block runs past ``s`` seconds."""
        return Timeout(self, time.monotonic() + seconds)

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        self._tick_slot = slot
        self._tick = loop.call_later(max(slot * self._resolution - time.monotonic(), 0.001), self._fire)

    def _fire(self) -> None:
        now = int(time.monotonic() / self._resolution)
        self._tick = None
        try:
            slots = self._slots
            while slots and slots[0] <= now:
                bucket = self._buckets.pop(heapq.heappop(slots), None)
                if bucket is None:  # emptied by cancel()
                    continue
                self._count -= len(bucket)
                for callback, arg in bucket.values():
                    try:
                        callback(arg)
                    except Exception:  # one failing callback must not stop the others, or the ticking
                        log.exception("deadline callback %r failed", callback)
            self._fired = max(self._fired, now)
        finally:
            while self._slots and self._slots[0] not in self._buckets:  # drop the slots of emptied buckets
                heapq.heappop(self._slots)
            if self._slots and self._tick is None:
                assert self._loop is not None
                self._arm(self._loop, self._slots[0])


class Timeout:
    """An ``async with`` block cancelled at its deadline, which then raises TimeoutError."""

    __slots__ = ("_deadlines", "_expired", "_handle", "_task", "when")

    def __init__(self, owner: Deadlines, when: float) -> None:
        self._deadlines = owner
        self.when = when
        self._expired = False
        self._handle: Handle | None = None
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Timeout:
        self._task = asyncio.current_task()
        self._handle = self._deadlines.at(self.when, Timeout._expire, self)
        return self

    def _expire(self) -> None:
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._deadlines.cancel(self._handle)
        if self._expired and kind is asyncio.CancelledError and self._task is not None and self._task.uncancel() == 0:
            raise TimeoutError from exc


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.deadlines = Deadlines()


_local = _PerThread()


def deadlines() -> Deadlines:
    """This thread's deadlines (one event loop runs per thread at a time)."""
    return _local.deadlines


def timeout(seconds: float) -> Timeout:
    """``async with timeout(s):``: this thread's ``deadlines().timeout(s)``."""
    return _local.deadlines.timeout(seconds)
