"""The access log's fast path writes what ``logging`` would, in order, and never stalls a call."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from gateway import logs

T = 1_700_000_000.25  # a wall-clock time whose milliseconds every Python computes alike
FIELDS = ("rest", "/memgw.v1.ProduceService/ProduceSingle", "OK", "root", "127.0.0.1", 0.00123, 42)


def handler(max_pending: int = logs.MAX_PENDING) -> tuple[logs.BufferedStreamHandler, io.StringIO]:
    out = io.StringIO()
    h = logs.BufferedStreamHandler(out, max_pending=max_pending, flush_interval_s=None)  # flush() by hand
    h.setFormatter(logging.Formatter(logs.FORMAT))
    return h, out


def via_logging(fields: tuple[str, str, str, str, str, float, int], t: float) -> str:
    protocol, method, code, user, peer, seconds, request_id = fields
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, logs.ACCESS_FORMAT,
                               (protocol, method, code, user, peer, seconds * 1000, request_id), None)
    record.created, record.msecs = t, 250.0
    return logging.Formatter(logs.FORMAT).format(record) + "\n"


def test_an_access_line_is_the_text_logging_would_write(monkeypatch: pytest.MonkeyPatch) -> None:
    h, out = handler()
    monkeypatch.setattr(logs.time, "time", lambda: T)
    h.record(*FIELDS)
    h.record("grpc", "/memgw.v1.ConsumeService/ConsumeBatch", "UNAUTHENTICATED", "-", "ipv4:127.0.0.1:5", 12.5, 7)
    assert out.getvalue() == ""  # nothing formatted on the caller's path
    h.flush()
    assert out.getvalue() == via_logging(FIELDS, T) + via_logging(
        ("grpc", "/memgw.v1.ConsumeService/ConsumeBatch", "UNAUTHENTICATED", "-", "ipv4:127.0.0.1:5", 12.5, 7), T)
    assert " INFO gateway.access: rest /memgw.v1.ProduceService/ProduceSingle OK user=root peer=127.0.0.1 1.2ms id=42" \
        in out.getvalue()


def test_another_record_comes_after_the_access_lines_before_it() -> None:
    h, out = handler()
    logger = logging.getLogger("gateway.test_logs")
    logger.addHandler(h)
    logger.propagate = False
    try:
        h.record(*FIELDS)
        logger.warning("after the call")
        lines = out.getvalue().splitlines()
        assert len(lines) == 2
        assert "gateway.access: rest" in lines[0] and lines[1].endswith("WARNING gateway.test_logs: after the call")
    finally:
        logger.removeHandler(h)


def test_lines_the_output_cannot_take_are_counted_not_kept() -> None:
    h, out = handler(max_pending=2)
    for _ in range(5):
        h.record(*FIELDS)
    assert len(h.pending) == 2
    h.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[2].endswith("WARNING gateway.access: 3 access lines dropped: the log output did not keep up")
    h.record(*FIELDS)
    h.flush()
    assert len(out.getvalue().splitlines()) == 4  # the drop is reported once


def test_without_configure_access_lines_go_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    assert logs.access is logs._access_via_logging  # what tests and embedding programs get
    caplog.set_level(logging.INFO, logger="gateway.access")
    logs.access(*FIELDS)
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.getMessage() == "rest /memgw.v1.ProduceService/ProduceSingle OK user=root peer=127.0.0.1 1.2ms id=42"


async def test_a_loop_timer_writes_the_lines_in_chunks_in_order() -> None:
    class Counting(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    out = Counting()
    h = logs.BufferedStreamHandler(out, flush_interval_s=0.01)
    h.setFormatter(logging.Formatter(logs.FORMAT))
    total = logs.CHUNK * 2 + 3
    for i in range(total):
        h.record(*FIELDS[:-1], i)
    assert out.getvalue() == ""  # nothing formatted on the caller's path
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not h.pending:
            break
    ids = [int(line.rsplit("id=", 1)[1]) for line in out.getvalue().splitlines()]
    assert ids == list(range(total))
    assert out.writes == 3  # one write per chunk of CHUNK lines
    h.record(*FIELDS)  # the timer is armed again for the next line
    await asyncio.sleep(0.05)
    assert out.getvalue().endswith("id=42\n")


def test_off_an_event_loop_a_line_is_written_at_once() -> None:
    out = io.StringIO()
    h = logs.BufferedStreamHandler(out)
    h.setFormatter(logging.Formatter(logs.FORMAT))
    h.record(*FIELDS)
    assert out.getvalue().endswith("id=42\n")
