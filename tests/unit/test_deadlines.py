"""Coarse deadlines: never early, at most a tick late, cancellable, idle when empty."""

from __future__ import annotations

import asyncio
import time

from gateway.core.deadlines import Deadlines


async def test_fires_after_its_time_and_within_a_tick() -> None:
    d = Deadlines(resolution_s=0.01)
    fired: list[tuple[str, float]] = []
    start = time.monotonic()
    for name, delay in (("b", 0.05), ("a", 0.02), ("c", 0.08)):
        d.at(start + delay, lambda n: fired.append((n, time.monotonic() - start)), name)
    await asyncio.sleep(0.15)
    assert [n for n, _ in fired] == ["a", "b", "c"]
    for (_, at), due in zip(fired, (0.02, 0.05, 0.08), strict=True):
        assert due <= at < due + 0.05  # a tick late at most, plus this machine's scheduling noise
    assert len(d) == 0


async def test_cancelled_never_fires_and_the_tick_stops() -> None:
    d = Deadlines(resolution_s=0.01)
    fired: list[int] = []
    keys = [d.at(time.monotonic() + 0.02, fired.append, i) for i in range(100)]
    for key in keys[1:]:
        d.cancel(key)
    d.cancel(keys[1])  # twice is harmless
    await asyncio.sleep(0.06)
    assert fired == [0]
    assert d._tick is None  # nothing pending: no timer left running


def test_a_new_loop_starts_clean() -> None:
    d = Deadlines(resolution_s=0.01)
    fired: list[str] = []

    async def arm_and_leave() -> None:
        d.at(time.monotonic() + 10, fired.append, "old")

    async def arm_and_wait() -> None:
        d.at(time.monotonic() + 0.01, fired.append, "new")
        await asyncio.sleep(0.05)

    asyncio.run(arm_and_leave())
    asyncio.run(arm_and_wait())
    assert fired == ["new"] and len(d) == 0


async def test_a_failing_callback_stops_neither_the_others_nor_the_ticking() -> None:
    d = Deadlines(resolution_s=0.01)
    fired: list[str] = []

    def boom(_: object) -> None:
        raise RuntimeError("boom")

    now = time.monotonic()
    d.at(now + 0.01, boom, None)
    d.at(now + 0.01, fired.append, "same tick")
    d.at(now + 0.05, fired.append, "later tick")
    await asyncio.sleep(0.12)
    assert fired == ["same tick", "later tick"]


async def test_far_deadlines_arm_one_timer_not_a_sweep() -> None:
    """10,000 idle long polls a minute from their deadline must not tick every 10 ms."""
    import time

    from gateway.core.deadlines import Deadlines

    timers = Deadlines()
    fired: list[int] = []
    ticks = 0
    original = timers._fire

    def counting() -> None:
        nonlocal ticks
        ticks += 1
        original()

    timers._fire = counting  # type: ignore[method-assign]
    handles = [timers.at(time.monotonic() + 60, fired.append, i) for i in range(10_000)]
    near = timers.at(time.monotonic() + 0.05, fired.append, -1)
    await asyncio.sleep(0.3)
    assert fired == [-1] and ticks <= 3  # before: a sweep every 10 ms, ~30 here
    for h in handles:
        timers.cancel(h)
    timers.cancel(near)
    assert len(timers) == 0
