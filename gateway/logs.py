"""Logging set-up: cheap records, and a stderr handler that does not write once per line.

The access log writes one line per call; a plain StreamHandler pays a write()
syscall and a flush for each. Here access lines go to a buffer that is written out
when it fills and at least every FLUSH_INTERVAL_S; every other record is written
(with what is buffered before it) at once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

FLUSH_INTERVAL_S = 0.5
BUFFERED = frozenset({"gateway.access"})  # the per-call lines; every other record is written at once
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._last_flush = time.monotonic()
        self._flusher = threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.name not in BUFFERED or time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
                self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        super().flush()

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
                with self.lock:  # type: ignore[union-attr]
                    self.flush()


def configure(level: str) -> None:
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
