"""Pipelined JetStream publishing: a whole batch in flight on one connection.

nats-py's ``publish_async`` costs a semaphore, a Future, a random token and a
header encoding per message, and the gateway's batches pay that for every
element. This publisher writes a batch as one run of ``HPUB`` commands (the
header block encoded once per distinct header set), with replies on one
wildcard inbox subscription per connection, and resolves a single future per
batch when the last acknowledgement arrives. The broker's answers are the
same PubAcks nats-py reads: ``{"stream": ..., "seq": ...}`` or ``{"error": ...}``,
and a 503 status message when no stream listens on the subject.

It uses two private nats-py calls (``_send_command``, ``_flush_pending``): the
NATS wire protocol they write is stable; nats-py is pinned below 3 for them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_CRLF = b"\r\n"
UNAVAILABLE = "broker unavailable: "  # errors with this prefix mean: retry the whole call later
_HDR_LINE = b"NATS/1.0\r\n"


def encode_headers(headers: dict[str, str]) -> bytes:
    """A NATS header block (values must not hold CR/LF: the servicers refuse those)."""
    parts = [_HDR_LINE]
    for key, value in headers.items():
        parts.append(f"{key}: {value}\r\n".encode())
    parts.append(_CRLF)
    return b"".join(parts)


@dataclass(slots=True)
class _Batch:
    errors: list[str | None]
    remaining: int
    done: asyncio.Future[None]


def _expire(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


class Publisher:
    """Publishes batches with every message in flight; one instance per nats connection."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix = ""
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._sub: Any = None

    async def _ensure_subscribed(self) -> None:
        if self._sub is None:
            self._prefix = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._prefix}.*.*", cb=self._on_reply)

    async def publish(
        self,
        items: Sequence[tuple[str, bytes, bytes]],
        seconds: float,
        track: Callable[[asyncio.Future[None]], None] | None = None,
    ) -> list[str | None]:
        """Publish (subject, header block, payload) items; one error text or None per item, in order.

        Raises TimeoutError when some acknowledgement has not come within ``seconds``; ``track``
        receives the batch's future (a session fails it when its connection drops)."""
        await self._ensure_subscribed()
        batch_id = next(self._ids)
        loop = asyncio.get_running_loop()
        batch = _Batch(errors=[None] * len(items), remaining=len(items), done=loop.create_future())
        self._batches[batch_id] = batch
        if track is not None:
            track(batch.done)
        prefix = f"{self._prefix}.{batch_id}."
        commands = []
        for i, (subject, header_block, payload) in enumerate(items):
            hdr_len = len(header_block)
            commands.append(
                f"HPUB {subject} {prefix}{i} {hdr_len} {hdr_len + len(payload)}\r\n".encode()
                + header_block + payload + _CRLF
            )
        expiry = loop.call_later(seconds, _expire, batch.done)  # cheaper than asyncio.timeout per call
        try:
            await self._nc._send_command(b"".join(commands))
            await self._nc._flush_pending()
            await batch.done
        finally:
            expiry.cancel()
            self._batches.pop(batch_id, None)
            if not batch.done.done():
                batch.done.cancel()
        return batch.errors

    async def _on_reply(self, msg: Any) -> None:
        _, _, tail = msg.subject.rpartition(f"{self._prefix}.")
        batch_id, _, index = tail.partition(".")
        batch = self._batches.get(int(batch_id))
        if batch is None:  # timed out already
            return
        i = int(index)
        data = msg.data
        if not data:  # a status message: 503 no responders (no stream, or no stream leader)
            status = (msg.headers or {}).get("Status", "")
            batch.errors[i] = UNAVAILABLE + ("the station's stream does not answer (no leader?); retry shortly"
                                             if status == "503" else f"status {status or 'unknown'}")
        elif b'"error"' in data[:16]:
            try:
                error = orjson.loads(data)["error"]
                code, text = int(error.get("code", 0)), error.get("description", "")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                code, text = 0, ""
            batch.errors[i] = f"{UNAVAILABLE}{text}" if code >= 500 else f"broker refused the message: {text}"
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
