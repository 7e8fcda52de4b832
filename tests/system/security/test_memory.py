"""Issue 10, item 1 and the medium items on memory: what one request may cost the gateway.

A batch of tiny elements (`[0,0,...]`) was serialised element by element before its length was
checked: 200k elements (400 KB) grew RSS by 800 MB, 1M elements by 4 GB with the event loop
blocked for seconds. JSON nested deeper than 1024 was a 500. A consume of many big messages
was bounded by count only.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.system.security.conftest import MB, Api, GatewayProcess, RssWatch, StallProbe, figure


def tiny_batch(n: int) -> bytes:
    return b"[" + b",".join([b"0"] * n) + b"]"


async def post_batch(api: Api, station: str, body: bytes) -> tuple[int | None, float]:
    token = await api.token()
    t = time.monotonic()
    try:
        status, _, _ = await api.post(f"/stations/{station}/produce/batch", data=body, token=token,
                                      headers={"Content-Type": "application/json"})
    except (aiohttp.ClientError, OSError) as exc:  # the watchdog killed the gateway mid-request
        print(f"request failed: {exc!r}")
        status = None
    return status, time.monotonic() - t


@pytest.mark.fresh_gateway
@pytest.mark.timeout(90)
async def test_batch_of_200k_tiny_elements_is_refused_fast_and_small(api: Api, gw: GatewayProcess,
                                                                     station: str) -> None:
    await api.produce_text(station, "exists")
    body = tiny_batch(200_000)
    with RssWatch(gw) as watch:
        async with StallProbe(gw) as probe:
            status, took = await post_batch(api, station, body)
            await asyncio.sleep(0.2)
    figure("batch-tiny-200k", f"{len(body) / 1024:.0f} KB body: status {status} in {took:.2f} s, "
           f"{watch.describe()}, worst stall {probe.worst:.2f} s",
           status=status, seconds=took, rss_mb=watch.growth_mb, stall_s=probe.worst, killed=watch.killed)
    assert status is not None and 400 <= status < 500, status
    assert took < 1.0
    assert watch.growth_mb < 100


@pytest.mark.fresh_gateway
@pytest.mark.timeout(120)
async def test_batch_of_1m_tiny_elements_grows_nothing(api: Api, gw: GatewayProcess, station: str) -> None:
    """2 MB of body: the body-size limit may refuse it by bytes, as long as nothing grows."""
    await api.produce_text(station, "exists")
    body = tiny_batch(1_000_000)
    with RssWatch(gw) as watch:
        async with StallProbe(gw) as probe:
            status, took = await post_batch(api, station, body)
            await asyncio.sleep(0.2)
    figure("batch-tiny-1m", f"{len(body) / MB:.1f} MB body: status {status} in {took:.2f} s, "
           f"{watch.describe()}, worst stall {probe.worst:.2f} s",
           status=status, seconds=took, rss_mb=watch.growth_mb, stall_s=probe.worst, killed=watch.killed)
    assert not watch.killed
    assert status is not None and 400 <= status < 500, status
    assert took < 2.0
    assert watch.growth_mb < 100
    assert probe.worst < 1.0


@pytest.mark.fresh_gateway
@pytest.mark.timeout(120)
async def test_accepted_batches_of_tiny_elements_hold_what_they_sent(api: Api, gw: GatewayProcess,
                                                                    station: str) -> None:
    """orjson 3.12+ returns each text in a buffer of at least 4 KiB: a batch of 5,000 `{}` (15 KB, within
    every limit) held 20 MB until the broker acknowledged it. 30 at once must not grow the gateway by
    more than their messages are worth."""
    await api.produce_text(station, "exists")
    body = b"[" + b",".join([b"{}"] * 5000) + b"]"
    with RssWatch(gw) as watch:
        results = await asyncio.gather(*[post_batch(api, station, body) for _ in range(30)])
        await asyncio.sleep(0.2)
    statuses = sorted({status for status, _ in results}, key=str)
    figure("batch-accepted-30x5000", f"30 concurrent batches of 5,000 `{{}}` ({len(body) / 1024:.0f} KB each): "
           f"statuses {statuses}, {watch.describe()}",
           statuses=statuses, rss_mb=watch.growth_mb, killed=watch.killed)
    assert statuses == [200]
    assert watch.growth_mb < 120


@pytest.mark.timeout(90)
async def test_batch_nested_deeper_than_1024_is_a_4xx(api: Api, gw: GatewayProcess, station: str) -> None:
    await api.produce_text(station, "exists")
    results = {}
    for depth in (1025, 5000, 100_000):
        body = b"[" + b"[" * depth + b"]" * depth + b"]"
        status, _ = await post_batch(api, station, body)
        results[depth] = status
    alive = gw.alive()
    figure("json-deep", ", ".join(f"depth {d}: {s}" for d, s in results.items()) + f"; gateway alive {alive}",
           statuses=results)
    assert alive
    for depth, status in results.items():
        assert status is not None and 400 <= status < 500, (depth, status)


@pytest.mark.fresh_gateway
@pytest.mark.timeout(120)
async def test_consume_of_many_big_messages_is_bounded_by_bytes(api: Api, gw: GatewayProcess, nc: object,
                                                                station: str) -> None:
    """Cheap version of the 40 x 7 MB attack: 12 x 7 MB (84 MB > nats-server's 64 MB pending limit)
    consumed in one batch. The answer must stay bounded by bytes (the rest left for the next call),
    and the user's broker connection must survive: the next produce and consume answer 200."""
    import nats.js  # noqa: F401 (nc is a nats.NATS)

    assert (await api.produce_text(station, "first"))[0] == 200
    assert (await api.consume(station, batch_size=10, wait_ms=200))[0] == 200  # group exists, 'first' taken
    js = nc.jetstream()  # type: ignore[attr-defined]
    big = b"x" * (7 * MB)
    for _ in range(12):
        await js.publish(f"{station}$1.final", big, timeout=30)
    with RssWatch(gw) as watch:
        t = time.monotonic()
        status, body = await api.consume(station, batch_size=12, wait_ms=5000)
        took = time.monotonic() - t
    got = len(body) if isinstance(body, list) else 0
    size = sum(len(m.get("message", "")) for m in body) if isinstance(body, list) else 0
    after_produce = (await api.produce_text(station, "after"))[0]
    after_consume, _ = await api.consume(station, batch_size=1, wait_ms=500)
    figure("consume-big", f"12 x 7 MB in one consume: status {status} in {took:.1f} s, {got} messages "
           f"({size / MB:.0f} MB) in the answer, {watch.describe()}; then produce {after_produce}, "
           f"consume {after_consume}", status=status, messages=got, answer_mb=size / MB, rss_mb=watch.growth_mb,
           after_produce=after_produce, after_consume=after_consume)
    assert status == 200
    assert size <= 32 * MB  # bounded by bytes: not every message in one answer
    assert watch.growth_mb < 200
    assert after_produce == 200 and after_consume == 200
