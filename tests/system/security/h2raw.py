"""A few dozen lines of raw HTTP/2: enough to open many header-only gRPC streams on one connection.

No dependency (the ``h2`` package is not in the dev extras): frames are written by hand and HPACK
uses only static-table names with literal values, never the dynamic table, so every HEADERS block
is the same bytes. The reader answers SETTINGS and PING and counts what the server does to our
streams (RST_STREAM, END_STREAM, GOAWAY).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _string(value: str) -> bytes:
    raw = value.encode()
    assert len(raw) < 127
    return bytes([len(raw)]) + raw


def grpc_request_headers(path: str, authority: str, extra: dict[str, str] | None = None) -> bytes:
    """An HPACK block for a gRPC POST (literal values, static-table names, no dynamic table)."""
    block = b"\x83\x86"  # :method POST, :scheme http
    block += b"\x04" + _string(path)  # :path
    block += b"\x01" + _string(authority)  # :authority
    block += b"\x0f\x10" + _string("application/grpc")  # content-type (static index 31)
    block += b"\x00" + _string("te") + _string("trailers")
    for name, value in (extra or {}).items():
        block += b"\x00" + _string(name) + _string(value)
    return block


@dataclass
class H2Stats:
    max_concurrent_streams: int | None = None  # as the server's SETTINGS said (None: not sent = unlimited)
    reset: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)  # the server closed its side (END_STREAM)
    goaway: bool = False
    closed: bool = False  # the server closed the TCP connection


class RawH2:
    """One HTTP/2 connection; ``open_streams`` sends header-only requests that never send a message."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stats = H2Stats()
        self.next_id = 1
        self._reader_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        # our SETTINGS: a big window so the server never waits on us
        self.writer.write(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1 << 30)))
        self.writer.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 30))))
        await self.writer.drain()
        self._reader_task = asyncio.create_task(self._read())

    async def open_streams(self, count: int, path: str, extra: dict[str, str] | None = None,
                           chunk: int = 200) -> int:
        """Send ``count`` HEADERS frames (END_HEADERS, no END_STREAM); the number actually sent."""
        block = grpc_request_headers(path, f"{self.host}:{self.port}", extra)
        sent = 0
        while sent < count and not (self.stats.closed or self.stats.goaway):
            n = min(chunk, count - sent)
            out = bytearray()
            for _ in range(n):
                out += frame(HEADERS, END_HEADERS, self.next_id, block)
                self.next_id += 2
            try:
                self.writer.write(bytes(out))
                await asyncio.wait_for(self.writer.drain(), 10)
            except (ConnectionError, TimeoutError):
                self.stats.closed = True
                break
            sent += n
            await asyncio.sleep(0)
        return sent

    def held(self) -> int:
        """Streams we opened that the server has neither reset nor ended."""
        if self.stats.closed:
            return 0
        opened = (self.next_id - 1) // 2
        return opened - len(self.stats.reset | self.stats.ended)

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await self.reader.readexactly(length) if length else b""
                if kind == SETTINGS and not flags & ACK:
                    for i in range(0, len(payload), 6):
                        ident, value = struct.unpack(">HI", payload[i:i + 6])
                        if ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                            self.stats.max_concurrent_streams = value
                    self.writer.write(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self.writer.write(frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    self.stats.reset.add(stream)
                elif kind in (HEADERS, DATA) and flags & END_STREAM:
                    self.stats.ended.add(stream)
                elif kind == GOAWAY:
                    self.stats.goaway = True
        except (asyncio.IncompleteReadError, ConnectionError):
            self.stats.closed = True

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
