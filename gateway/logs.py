"""Logging set-up: cheap records, and an access log that costs a call one list append.

The access log writes one line per call (INFO, logger ``gateway.access``). Through ``logging``
each line is a LogRecord, a handler lock, a Formatter and a time conversion, on the event loop,
in the call's own time. :func:`configure` (what ``memphis-gateway serve`` runs) installs a fast
path instead: :func:`access` appends the call's fields to a list as one tuple, and a timer on the
same event loop formats them every ``FLUSH_INTERVAL_S``, ``CHUNK`` lines per loop callback (the
timestamp text once per second), and writes each chunk with one write. The lines are the very
text ``logging`` would write with ``FORMAT``. Every other record is written at once, after the
access lines pending before it. If the output cannot keep up (stderr blocked), at most
``MAX_PENDING`` lines wait; the rest are counted and reported in one WARNING line instead of
stalling the calls.

No thread: a Python thread that wakes up needs the GIL, and taking it from a busy event loop
costs the loop more than the work (unpinned, the loop waits while the thread is scheduled on a
CPU busy with nats-server or the load generator).

Without :func:`configure` (the gateway embedded in another program, tests with ``caplog``),
:func:`access` hands each line to ``logging`` as before.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

FLUSH_INTERVAL_S = 0.2
MAX_PENDING = 100_000  # access lines waiting to be written; beyond this they are counted, not kept
CHUNK = 256  # lines formatted per loop callback (about 0.3-0.5 ms)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_FORMAT = "%s %s %s user=%s peer=%s %.1fms id=%d"  # protocol, method, code, user, peer, ms, request id

access_log = logging.getLogger("gateway.access")

# (wall-clock time, protocol, method, code, user, peer, seconds, request id)
AccessFields = tuple[float, str, str, str, str, str, float, int]


def _access_via_logging(protocol: str, method: str, code: str, user: str, peer: str, seconds: float,
                        request_id: int) -> None:
    access_log.info(ACCESS_FORMAT, protocol, method, code, user, peer, seconds * 1000, request_id)


# One access line: ``access(protocol, method, code, user, peer, seconds, request_id)``. Callers
# check ``access_log.isEnabledFor(logging.INFO)`` first; configure() rebinds this to the fast path.
access: Callable[[str, str, str, str, str, float, int], None] = _access_via_logging


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes every record at once, and the access fast path's lines in batches from a loop timer."""

    def __init__(self, stream: TextIO, *, max_pending: int = MAX_PENDING,
                 flush_interval_s: float | None = FLUSH_INTERVAL_S) -> None:
        super().__init__(stream)
        self.pending: list[AccessFields] = []
        self.max_pending = max_pending
        self.dropped = 0
        self._dropped_reported = 0
        self._second = -1
        self._second_text = ""
        self.flush_interval_s = flush_interval_s  # None: no timer (flush() by hand)
        self._timer = False  # a flush is scheduled on the loop
        self._left = 0  # lines the running flush still takes

    def record(self, protocol: str, method: str, code: str, user: str, peer: str, seconds: float,
               request_id: int) -> None:
        """The access fast path: formats nothing; arms the loop timer for the first pending line."""
        if len(self.pending) < self.max_pending:
            self.pending.append((time.time(), protocol, method, code, user, peer, seconds, request_id))
        else:
            self.dropped += 1
        if not self._timer and self.flush_interval_s is not None:
            self._arm()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not called on an event loop: write at once
            self.flush()
            return
        self._timer = True
        loop.call_later(self.flush_interval_s or 0.0, self._flush_on_loop, loop, True)

    def _flush_on_loop(self, loop: asyncio.AbstractEventLoop, first: bool) -> None:
        """One chunk of the lines pending when the timer fired, then the next chunk in a later callback."""
        with self.lock:  # type: ignore[union-attr]
            if first:
                self._left = len(self.pending)
            self._left -= self._write_pending(min(self._left, CHUNK))
            if self._left > 0:
                loop.call_soon(self._flush_on_loop, loop, False)
                return
            self._report_dropped()
            super().flush()
        self._timer = False
        if self.pending or self.dropped != self._dropped_reported:
            self._arm()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write_pending(len(self.pending))  # what happened before this record comes before it
            self.stream.write(self.format(record) + self.terminator)
            self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending(len(self.pending))
            self._left = 0
            self._report_dropped()
            super().flush()

    def _write_pending(self, n: int) -> int:
        """Format and write the first ``n`` pending access lines (the caller holds ``self.lock``)."""
        if n <= 0:
            return 0
        pending = self.pending
        batch = pending[:n]
        del pending[:n]
        self.stream.write("".join(map(self._line, batch)))
        return len(batch)

    def _report_dropped(self) -> None:
        dropped = self.dropped - self._dropped_reported
        if dropped:
            self._dropped_reported += dropped
            self.stream.write(f"{self._asctime(time.time())} WARNING gateway.access: {dropped} access lines "
                              f"dropped: the log output did not keep up\n")

    def _asctime(self, t: float) -> str:
        second = int(t)
        if second != self._second:  # logging.Formatter.formatTime's default text, once per second
            self._second = second
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._second_text},{int((t - second) * 1000):03d}"

    def _line(self, f: AccessFields) -> str:
        t, protocol, method, code, user, peer, seconds, request_id = f
        return (f"{self._asctime(t)} INFO gateway.access: {protocol} {method} {code} user={user} peer={peer} "
                f"{seconds * 1000:.1f}ms id={request_id}\n")


def configure(level: str) -> None:
    global access
    # The logging HOWTO's "Optimization": no caller lookup, no thread/process fields.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False, encoding="utf-8",
                  errors="backslashreplace")
    handler = BufferedStreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # nats-py's default error callback logs a traceback per failed (re)connect; memphis-py's connect
    # runs with it before the session installs its own callbacks, which log one line per outage
    # (gateway/broker/sessions.py, Session.watch; the service connections in gateway/broker_setup.py)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    access = handler.record
