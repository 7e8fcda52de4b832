"""Pipelined JetStream publishing: a whole batch in flight on one connection.

nats-py's ``publish_async`` costs a semaphore, a Future, a random token and a
header encoding per message, and the gateway's batches pay that for every
element. This publisher writes a batch as one run of ``HPUB`` commands (the
header block encoded once per distinct header set), with replies on one
wildcard inbox subscription per connection, and resolves a single future per
batch when the last acknowledgement arrives. The broker's answers are the
same PubAcks nats-py reads: ``{"stream": ..., "seq": ...}`` or ``{"error": ...}``,
and a 503 status message when no stream listens on the subject.

It uses nats-py's private write path (``_send_command``, and ``_flush_queue`` to kick
its flusher once per flush, as nats-py's own ``publish`` does, with ``_flush_pending``
as the fallback), and takes replies the way nats-py's one-shot requests do
(``subscribe(future=...)``, see ``_ReplySink``): the NATS wire protocol they write is
stable; nats-py is pinned below 3 for them, and tests/integration/test_publisher.py fails if they change.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.core.deadlines import deadlines
from gateway.core.headers import MessageHeaders

_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class PublishError:
    """Why the broker did not store one message: ``retryable`` means the broker could not take it
    (no stream leader, a server error: retry the whole call later), else it refused this message."""

    text: str
    retryable: bool = False


_PENDING = PublishError("no acknowledgement yet", retryable=True)
HEADER_LINE = b"NATS/1.0\r\n"


def header_lines(items: Mapping[str, str]) -> bytes:
    """``Key: value`` lines, each ended by CRLF."""
    return "".join([f"{key}: {value}\r\n" for key, value in items.items()]).encode()


def encode_headers(headers: MessageHeaders, tail: bytes = b"") -> bytes:
    """A NATS header block: the message's headers, its idempotency key, then ``tail`` (encoded lines).

    ``MessageHeaders`` holds no CR, LF or NUL (``gateway.core.headers`` refused them). The key goes
    out as ``Nats-Msg-Id`` (stock nats-server deduplicates on it) and as ``msg-id`` (the Memphis
    server's name for it; docs/memphis-py.md, B3)."""
    lines = header_lines(headers.items)
    if headers.idempotency_key:
        key = headers.idempotency_key
        lines += f"Nats-Msg-Id: {key}\r\nmsg-id: {key}\r\n".encode()
    return HEADER_LINE + lines + tail + _CRLF


def _hpub_commands(items: Sequence[tuple[str, bytes, bytes]], reply_prefix: str) -> bytes:
    """One HPUB command per item, joined; item i's acknowledgement comes on ``<reply_prefix><i>``."""
    return b"".join(
        f"HPUB {subject} {reply_prefix}{i} {len(block)} {len(block) + len(payload)}\r\n".encode()
        + block + payload + _CRLF
        for i, (subject, block, payload) in enumerate(items)
    )


@dataclass(slots=True)
class _Batch:
    errors: list[PublishError | None]  # _PENDING until the item's acknowledgement came
    remaining: int
    done: asyncio.Future[None]


def _expire(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


class _ReplySink:
    """Where nats-py delivers the publisher's replies: in its read loop, with no queue or task.

    nats-py hands a message for a subscription made with ``future=`` to ``future.set_result``
    (the path of its one-shot requests), and otherwise puts it on the subscription's queue,
    whose task then calls the callback: one queue put, one task wake-up and one coroutine
    per acknowledgement. This sink takes every reply the first way."""

    __slots__ = ("set_result",)

    def __init__(self, on_reply: Callable[[Any], None]) -> None:
        self.set_result = on_reply

    def cancelled(self) -> bool:
        return False


class Publisher:
    """Publishes batches with every message in flight; one instance per nats connection."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix = ""
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._sub: Any = None
        self._subscribing: asyncio.Future[None] | None = None  # one subscription, however many publish at once
        # What kicks nats-py's flusher: it writes what is pending, then resolves the future it took
        # unless done. _flush_pending() would make a new one (and a coroutine) per kick; nothing
        # waits on this one, so one resolved future serves every kick.
        self._kick: asyncio.Future[None] | None = None

    async def _subscribe(self) -> None:
        self._kick = asyncio.get_running_loop().create_future()
        self._kick.set_result(None)
        self._prefix = self._nc.new_inbox() + "."  # replies come on <prefix><batch>.<index>
        self._sub = await self._nc.subscribe(f"{self._prefix}*.*", future=_ReplySink(self._on_reply))

    async def publish(
        self, items: Sequence[tuple[str, bytes, bytes]], seconds: float
    ) -> list[PublishError | None]:
        """Publish (subject, header block, payload) items; one error or None per item, in order.

        Raises TimeoutError when some acknowledgement has not come within ``seconds``, and what
        :meth:`fail_all` was given when the connection drops first."""
        if self._sub is None:
            if self._subscribing is None or self._subscribing.done():  # done with no _sub: it failed, try again
                self._subscribing = asyncio.ensure_future(self._subscribe())
            await asyncio.shield(self._subscribing)
        batch_id = next(self._ids)
        timers = deadlines()
        batch = _Batch(errors=[_PENDING] * len(items), remaining=len(items), done=timers.loop().create_future())
        self._batches[batch_id] = batch
        expiry = timers.at(time.monotonic() + seconds, _expire, batch.done)
        try:
            nc = self._nc
            # no local holds the commands while the acknowledgements come: they are nats-py's until written
            await nc._send_command(_hpub_commands(items, f"{self._prefix}{batch_id}."))
            queue, flusher = nc._flush_queue, nc._flusher_task
            if queue is None or flusher is None or flusher.done():
                await nc._flush_pending()  # it knows what to do without a running flusher
            elif queue.empty():  # as nats-py's publish: one kick of its flusher per flush
                queue.put_nowait(self._kick)
            await batch.done
        finally:
            timers.cancel(expiry)
            self._batches.pop(batch_id, None)
            if not batch.done.done():
                batch.done.cancel()
        return batch.errors

    def fail_all(self, exc: BaseException) -> None:
        """Fail every batch awaiting acknowledgements (the connection dropped: they may never come)."""
        for batch in self._batches.values():
            if not batch.done.done():
                batch.done.set_exception(exc)

    def _on_reply(self, msg: Any) -> None:
        """One acknowledgement, in nats-py's read loop (see ``_ReplySink``): it must not raise."""
        batch_id, _, index = msg.subject[len(self._prefix):].partition(".")
        try:
            batch = self._batches.get(int(batch_id))
            i = int(index)
        except ValueError:  # not a reply to us: nothing publishes there but the broker
            return
        if batch is None or not 0 <= i < len(batch.errors) or batch.errors[i] is not _PENDING:
            return  # timed out already, or a duplicate: each item counts once
        data = msg.data
        error: PublishError | None = None
        if not data:  # a status message: 503 no responders (no stream, or no stream leader)
            status = (msg.headers or {}).get("Status", "")
            error = PublishError("the station's stream does not answer (no leader?); retry shortly"
                                 if status == "503" else f"status {status or 'unknown'}", retryable=True)
        elif b'"error"' in data[:16]:
            try:
                detail = orjson.loads(data)["error"]
                code, text = int(detail.get("code", 0)), detail.get("description", "")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                code, text = 0, ""
            error = PublishError(text, retryable=True) if code >= 500 else PublishError(
                f"broker refused the message: {text}")
        batch.errors[i] = error
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.done.done():
            batch.done.set_result(None)

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
