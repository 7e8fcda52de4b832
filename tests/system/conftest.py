"""System tests: the shipped artefacts (the container image) built and run for real."""

from __future__ import annotations

import pytest

# step -> seconds, filled by the tests of this directory, shown after the run
TIMINGS: dict[str, float] = {}
NOTES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS and not NOTES:
        return
    terminalreporter.section("system test timings")
    for step, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{step:<40} {seconds:8.1f} s")
    for note in NOTES:
        terminalreporter.write_line(f"note: {note}")
