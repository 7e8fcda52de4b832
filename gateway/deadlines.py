"""Coarse deadlines for the per-call hot path.

Every call has a deadline and every publish an acknowledgement timeout, and nearly all
of them are met. With uvloop, arming and cancelling a loop timer costs about 2 us (a
libuv timer each), which is several percent of a small request. Here a deadline is a
dict entry instead, and one loop timer ticks every ``RESOLUTION_S`` while any are
pending: a deadline fires up to ``RESOLUTION_S`` late, never early.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

RESOLUTION_S = 0.01
log = logging.getLogger("gateway.deadlines")


class Deadlines:
    def __init__(self, resolution_s: float = RESOLUTION_S) -> None:
        self._resolution = resolution_s
        self._entries: dict[int, tuple[float, Callable[[Any], object], Any]] = {}
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, without ``asyncio.get_running_loop()``'s getpid() system call each time."""
        loop = self._loop
        if loop is None or not loop.is_running():
            running = asyncio.get_running_loop()
            if running is not loop:  # a new loop (tests run several): what the old one held is gone
                self._loop, self._entries, self._tick = running, {}, None
            loop = running
        return loop

    def at(self, when: float, callback: Callable[[Any], object], arg: Any) -> int:
        """Call ``callback(arg)`` once ``time.monotonic()`` has passed ``when``; returns a key for ``cancel``."""
        loop = self.loop()
        if self._tick is None:
            self._tick = loop.call_later(self._resolution, self._fire)
        key = next(self._keys)
        self._entries[key] = (when, callback, arg)
        return key

    def cancel(self, key: int) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _fire(self) -> None:
        now = time.monotonic()
        due = [key for key, (when, _, _) in self._entries.items() if when <= now]
        try:
            for key in due:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    try:
                        entry[1](entry[2])
                    except Exception:  # one failing callback must not stop the others, or the ticking
                        log.exception("deadline callback %r failed", entry[1])
        finally:
            assert self._loop is not None
            self._tick = self._loop.call_later(self._resolution, self._fire) if self._entries else None


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.deadlines = Deadlines()


_local = _PerThread()


def deadlines() -> Deadlines:
    """This thread's deadlines (one event loop runs per thread at a time)."""
    return _local.deadlines
