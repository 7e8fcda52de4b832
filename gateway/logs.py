"""Logging set-up: cheap records, and an access log that costs a call one list append.

The access log writes one line per call (INFO, logger ``gateway.access``). Through ``logging``
each line is a LogRecord, a handler lock, a Formatter and a time conversion, on the event loop,
in the call's own time. :func:`configure` (what ``memphis-gateway serve`` runs) installs a fast
path instead: :func:`access` appends the call's fields to a list as one tuple, and the handler's
flusher thread formats them in batches (the timestamp text once per second) and writes each
batch with one write, at least every ``FLUSH_INTERVAL_S``. The lines are the very text
``logging`` would write with ``FORMAT``. Every other record is written at once, after the access
lines pending before it. If the output cannot keep up (stderr blocked), at most ``MAX_PENDING``
lines wait; the rest are counted and reported in one WARNING line instead of stalling the calls.

Without :func:`configure` (the gateway embedded in another program, tests with ``caplog``),
:func:`access` hands each line to ``logging`` as before.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

FLUSH_INTERVAL_S = 0.2
MAX_PENDING = 100_000  # access lines waiting for the flusher; beyond this they are counted, not kept
CHUNK = 256  # lines the flusher formats between two hand-backs of the GIL (about 0.5 ms)
BUFFERED = frozenset({"gateway.access"})  # the per-call lines; every other record is written at once
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
    def __init__(self, stream: TextIO, *, max_pending: int = MAX_PENDING,
                 flush_interval_s: float | None = FLUSH_INTERVAL_S) -> None:
        super().__init__(stream)
        self.pending: list[AccessFields] = []  # appended on the event loop, drained by the flusher
        self.max_pending = max_pending
        self.dropped = 0  # written only by record()
        self._dropped_reported = 0
        self._second = -1
        self._second_text = ""
        self._last_flush = time.monotonic()
        self.flush_interval_s = flush_interval_s  # None: no flusher thread (flush() by hand)
        if flush_interval_s is not None:
            threading.Thread(target=self._flush_periodically, args=(flush_interval_s,), name="log-flush",
                             daemon=True).start()

    def record(self, protocol: str, method: str, code: str, user: str, peer: str, seconds: float,
               request_id: int) -> None:
        """The access fast path: runs on the event loop, formats nothing."""
        if len(self.pending) < self.max_pending:
            self.pending.append((time.time(), protocol, method, code, user, peer, seconds, request_id))
        else:
            self.dropped += 1

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name in BUFFERED:
                self.stream.write(self.format(record) + self.terminator)
                if time.monotonic() - self._last_flush >= (self.flush_interval_s or 0):
                    self.flush()
            else:
                self._write_pending()  # what happened before this record comes before it
                self.stream.write(self.format(record) + self.terminator)
                self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending(yield_gil=threading.current_thread() is not threading.main_thread())
            self._last_flush = time.monotonic()
            super().flush()

    def _write_pending(self, yield_gil: bool = False) -> None:
        """Format and write the pending access lines (the caller holds ``self.lock``, or it is emit()).

        From the flusher thread (``yield_gil``), a chunk at a time, handing the GIL back to the event
        loop between chunks: the loop never waits for more than one chunk's formatting."""
        pending = self.pending
        left = len(pending)  # record() may append meanwhile: only these are taken
        while left > 0:
            n = min(left, CHUNK)
            batch = pending[:n]
            del pending[:n]
            left -= n
            self.stream.write("".join(map(self._line, batch)))
            if yield_gil and left:
                time.sleep(0)
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

    def _flush_periodically(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            if self.pending or time.monotonic() - self._last_flush >= interval_s:
                self.flush()


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
    for noisy in ("nats", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    access = handler.record
