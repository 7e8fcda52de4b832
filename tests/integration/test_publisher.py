"""The pipelined publisher on a real nats-server: acknowledgements, refusals, and stray replies.

Replies are handled in nats-py's read loop (``_ReplySink``), so whatever arrives on the
publisher's inbox must never raise there: the connection would be torn down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from gateway.broker.publisher import Publisher, encode_headers
from gateway.core.headers import EMPTY, MessageHeaders
from gateway.embedded.server import EmbeddedBroker
from tests.conftest import connect_root

STREAM = "pubtest"


@pytest.fixture(scope="module")
async def nc(nats_server: EmbeddedBroker) -> AsyncIterator[Client]:
    client = await connect_root(nats_server, name="tests::publisher")
    await client.jetstream().add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.>"]))
    try:
        yield client
    finally:
        await client.close()


async def stored(nc: Client) -> int:
    info = await nc.jetstream().stream_info(STREAM)
    return int(info.state.messages)


async def test_a_batch_is_stored_and_answered_in_order(nc: Client) -> None:
    publisher = Publisher(nc)
    before = await stored(nc)
    block = encode_headers(MessageHeaders(items={"x-test": "1"}))
    items = [(f"{STREAM}.a", block, f"m{i}".encode()) for i in range(50)]
    items.insert(10, ("nostream.here", block, b"lost"))  # no stream listens: 503 for this one only
    errors = await publisher.publish(items, 5.0)
    assert len(errors) == 51 and errors[:10] == [None] * 10 and errors[11:] == [None] * 40
    assert errors[10] is not None and errors[10].retryable
    assert await stored(nc) == before + 50
    assert not publisher._batches  # nothing left waiting
    await publisher.close()


async def test_stray_replies_on_the_inbox_do_no_harm(nc: Client) -> None:
    publisher = Publisher(nc)
    assert await publisher.publish([(f"{STREAM}.b", encode_headers(EMPTY), b"first")], 5.0) == [None]
    prefix = publisher._prefix
    # Not a batch number, an index out of range, a batch long gone, a negative index, empty.
    for subject in (f"{prefix}x.y", f"{prefix}1.99", f"{prefix}424242.0", f"{prefix}1.-1", f"{prefix}.."):
        await nc.publish(subject, b'{"stream":"pubtest","seq":1}')
    await nc.flush()
    assert nc.is_connected
    before = await stored(nc)
    errors = await publisher.publish([(f"{STREAM}.b", encode_headers(EMPTY), b"second")] * 3, 5.0)
    assert errors == [None] * 3
    assert await stored(nc) == before + 3
    assert nc.stats["reconnects"] == 0
    await publisher.close()


async def test_a_duplicate_reply_does_not_complete_a_batch_early(nc: Client) -> None:
    """Each item counts once: a second reply for item 0 must not stand in for item 1's."""
    publisher = Publisher(nc)
    silent = await nc.subscribe("silent.subject")  # a listener that never answers: item 1 waits
    block = encode_headers(EMPTY)
    items = [(f"{STREAM}.c", block, b"x"), ("silent.subject", block, b"y")]
    task = asyncio.ensure_future(publisher.publish(items, 1.0))
    await asyncio.sleep(0.3)
    batch_id = max(publisher._batches)
    await nc.publish(f"{publisher._prefix}{batch_id}.0", b'{"stream":"pubtest","seq":1}')  # item 0, again
    await nc.flush()
    with pytest.raises(TimeoutError):  # before the fix: [None, None], item 1 counted as stored
        await task
    await silent.unsubscribe()
    await publisher.close()


async def test_concurrent_first_publishes_share_one_reply_subscription(nc: Client) -> None:
    publisher = Publisher(nc)
    subs_before = len(nc._subs)
    results = await asyncio.gather(*(publisher.publish([(f"{STREAM}.d", encode_headers(EMPTY), b"m")], 5.0)
                                     for _ in range(8)))
    assert results == [[None]] * 8
    assert len(nc._subs) == subs_before + 1
    await publisher.close()
