"""Who ran where: the scheduler's view of a measurement (``bench/run.py --sched``, or standalone).

    python bench/sched.py --pid PID [--seconds 3]     # while something loads process PID

Records ``sched:sched_switch`` on every CPU with ``perf record -a`` (root, or a low
``kernel.perf_event_paranoid``) and reports, for the process under test:

- each CPU's occupancy by process (the process under test, nats-server, the load generator,
  anything else), idle included;
- its main thread (the event loop): the share of the time it ran, the share it waited runnable
  (preempted: the CPU it wanted ran something else), and who preempted it how often.

This is how the unpinned/pinned difference was looked at: pinned, the event loop has a CPU of its
own; unpinned, the load generator and nats-server are woken on its CPU (a loopback send wakes the
reader on the sender's CPU) and preempt it about once per request.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:\s+prev_comm=(.*?) prev_pid=(\d+) .*?"
                     r"prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")


def available() -> str | None:
    """Why sched recording cannot work here, or None."""
    if shutil.which("perf") is None:
        return "perf not found (apt-get install -y linux-perf)"
    with contextlib.suppress(OSError, ValueError):
        paranoid = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
        if paranoid > 0 and os.geteuid() != 0:
            return f"kernel.perf_event_paranoid is {paranoid} and we are not root"
    return None


def threads_of(pid: int) -> set[str]:
    with contextlib.suppress(OSError):
        return set(os.listdir(f"/proc/{pid}/task"))
    return set()


@dataclass(slots=True)
class Recording:
    """``perf record -a -e sched:sched_switch`` for a while, in the background."""

    seconds: float
    path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="memgw-sched-", suffix=".data")[1]))
    _thread: threading.Thread | None = None
    error: str = ""

    def start(self) -> Recording:
        def run() -> None:
            proc = subprocess.run(["perf", "record", "-q", "-a", "-e", "sched:sched_switch", "-o", str(self.path),
                                   "--", "sleep", str(self.seconds)], capture_output=True, text=True)
            if proc.returncode != 0:
                self.error = proc.stderr.strip()[-300:] or f"perf exited with {proc.returncode}"

        self._thread = threading.Thread(target=run, name="perf-sched", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join(self.seconds + 30)

    def report(self, pid: int, labels: dict[str, set[str]] | None = None, name: str = "server") -> str:
        """The text report for process ``pid`` (``labels``: more processes by name, as sets of thread ids)."""
        self.wait()
        try:
            if self.error:
                return f"sched: {self.error}"
            script = subprocess.run(["perf", "script", "-i", str(self.path), "-F", "cpu,time,event,trace"],
                                    capture_output=True, text=True, timeout=120).stdout
            return analyze(script, pid, {name: threads_of(pid), **(labels or {})}, name)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()


def analyze(script: str, pid: int, labels: dict[str, set[str]], name: str = "server") -> str:
    main = str(pid)

    def label(tid: str, comm: str) -> str:
        if tid == "0":
            return "idle"
        if tid == main:
            return name
        for lab, tids in labels.items():
            if tid in tids:
                return lab if lab != name else f"{name} thread {comm}"  # its other threads, by name
        if comm.startswith(("wrk", "h2load")):
            return "load generator"
        if comm.startswith("nats-server"):
            return "nats-server"
        return "other"

    running: dict[int, tuple[str, str, float]] = {}  # cpu -> (tid, label, since)
    occupancy: dict[tuple[int, str], float] = collections.defaultdict(float)
    preempted_by: collections.Counter[str] = collections.Counter()
    ran = waited = blocked = 0.0
    blocks = 0
    runnable_since: float | None = None
    blocked_since: float | None = None
    first = last = None
    for line in script.splitlines():
        m = _SWITCH.search(line)
        if m is None:
            continue
        cpu, t = int(m[1]), float(m[2])
        prev_tid, prev_state, next_comm, next_tid = m[4], m[5], m[6], m[7]
        first = t if first is None else first
        last = t
        if cpu in running:
            tid, lab, since = running[cpu]
            occupancy[(cpu, lab)] += t - since
            if tid == main:
                ran += t - since
        running[cpu] = (next_tid, label(next_tid, next_comm), t)
        if prev_tid == main and prev_state.startswith("R"):
            runnable_since = t
            preempted_by[label(next_tid, next_comm)] += 1
        elif prev_tid == main:  # it went to sleep: epoll with nothing to do, the GIL, a lock
            blocked_since = t
            blocks += 1
        elif next_tid == main and runnable_since is not None:
            waited += t - runnable_since
            runnable_since = None
        if next_tid == main and blocked_since is not None:
            blocked += t - blocked_since  # (includes the wake-up latency)
            blocked_since = None
    if first is None or last is None or last <= first:
        return "sched: no scheduler events recorded"
    span = last - first
    cpus = sorted({c for c, _ in occupancy})
    lines = [f"sched ({span:.1f} s, perf sched_switch):"]
    for cpu in cpus:
        parts = sorted(((v, lab) for (c, lab), v in occupancy.items() if c == cpu), reverse=True)
        lines.append(f"    CPU{cpu}: " + ", ".join(f"{lab} {v / span:.0%}" for v, lab in parts if v / span >= 0.005))
    total = sum(preempted_by.values())
    who = ", ".join(f"{lab} {n / span:,.0f}/s" for lab, n in preempted_by.most_common(4))
    lines.append(f"    {name} event loop: ran {ran / span:.0%}, waited runnable {waited / span:.0%}, "
                 f"blocked {blocked / span:.0%} ({blocks / span:,.0f} sleeps/s); "
                 f"preempted {total / span:,.0f}/s ({who or 'never'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=int, required=True, help="the process under test (its main thread = event loop)")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args(argv)
    why = available()
    if why:
        sys.exit(f"bench/sched.py: {why}")
    rec = Recording(a.seconds).start()
    time.sleep(a.seconds)
    print(rec.report(a.pid))


if __name__ == "__main__":
    main()
