"""Shared pieces of the benchmark: payloads, CPU pinning, process accounting, JetStream helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MSG_SIZE = 256
RAW_STREAM = "bench_raw"  # baselines A, B, C publish here
DRAIN_STREAM = "bench_drain"  # baseline D drains this one
MEMPHIS_HEADERS = {"$memphis_producedBy": "bench", "$memphis_connectionId": "bench-prefill", "x-bench": "1"}


def payload(size: int = MSG_SIZE, i: int = 0) -> bytes:
    """A compact JSON object of exactly ``size`` bytes (so REST batches and consumes keep it as is)."""
    head = b'{"i":%d,"pad":"' % i
    tail = b'"}'
    pad = size - len(head) - len(tail)
    if pad < 0:
        raise ValueError(f"message size {size} too small")
    return head + b"x" * pad + tail


def python_env() -> dict[str, str]:
    """Environment for our Python children: the repo and its generated stubs importable."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "generated")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- CPU pinning ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pinning:
    """Servers under test on ``server`` CPUs; nats-server and load generators on ``client`` CPUs."""

    server: tuple[int, ...] | None
    client: tuple[int, ...] | None

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2 or shutil.which("taskset") is None:  # taskset: for the load generators
            return cls(None, None)
        return cls((cpus[0],), (cpus[1],))

    @property
    def active(self) -> bool:
        return self.server is not None

    def prefix(self, cpus: tuple[int, ...] | None) -> list[str]:
        if cpus is None:
            return []
        return ["taskset", "-c", ",".join(map(str, cpus))]

    def describe(self) -> str:
        if not self.active:
            return f"none: the scheduler places every process on CPUs {_cpus(all_cpus())}"
        return (
            f"servers under test (gateway, baselines B/C, Python clients A/D) on CPU {_cpus(self.server)}; "
            f"nats-server + load generator on CPU {_cpus(self.client)}"
        )


def _cpus(cpus: tuple[int, ...] | None) -> str:
    return ",".join(map(str, cpus or ()))


_ALL_CPUS = tuple(sorted(os.sched_getaffinity(0)))  # what the benchmark may use (it may run under taskset)


def all_cpus() -> tuple[int, ...]:
    return _ALL_CPUS


def set_affinity(pid: int, cpus: tuple[int, ...]) -> None:
    """Move a running process, every thread of it, to these CPUs (threads it starts later inherit)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), set(cpus))


def pin_self(cpus: tuple[int, ...] | None) -> None:
    """Pin this process (and so the children it starts later, like nats-server)."""
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))


# -- processes -----------------------------------------------------------------


@dataclass(slots=True)
class Child:
    """A child process we started; stopped by its own PID only."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)


def spawn(name: str, argv: Sequence[str], log_dir: Path, *, cpus: tuple[int, ...] | None, pinning: Pinning,
          env: dict[str, str] | None = None) -> Child:
    """Start a long-lived server; it gets SIGTERM if the benchmark dies without stopping it."""
    log_path = log_dir / f"{name}.log"
    orphan_guard = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*orphan_guard, *pinning.prefix(cpus), *argv], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, cwd=ROOT, env=env or python_env(), start_new_session=True,
        )
    return Child(name, proc, log_path)


@dataclass(slots=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system of the child (and its reaped children), from wait4


def run_measured(argv: Sequence[str], *, timeout: float, cpus: tuple[int, ...] | None, pinning: Pinning,
                 env: dict[str, str] | None = None, stop_event: threading.Event | None = None) -> Finished:
    """Run a command to completion (SIGINT at ``timeout`` or when ``stop_event`` is set), with its CPU time.

    Blocking: call it through ``asyncio.to_thread``. stdout/stderr go to temporary files so a chatty
    child never blocks on a full pipe."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([*pinning.prefix(cpus), *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                cwd=ROOT, env=env or python_env())
        status, rusage = _wait4_bounded(proc, timeout, stop_event)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Finished(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        wall, rusage.ru_utime + rusage.ru_stime)


def _wait4_bounded(proc: subprocess.Popen[bytes], timeout: float, stop_event: threading.Event | None) -> Any:
    deadline = time.monotonic() + timeout
    interrupted = False
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            return status, rusage
        now = time.monotonic()
        stop = stop_event is not None and stop_event.is_set()
        if (now > deadline or stop) and not interrupted:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # wrk and h2load print their results on SIGINT
            interrupted = True
            deadline = now + 5.0
        elif interrupted and now > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
            return status, rusage
        time.sleep(0.01)


class CpuMeter:
    """CPU seconds used by a live process (all its threads) between start() and stop()."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self._proc = psutil.Process(pid) if pid else None
        self._t0 = self._c0 = 0.0
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def cpu(self) -> float:
        """CPU seconds the process used so far."""
        if self._proc is None:
            return 0.0
        try:
            t = self._proc.cpu_times()
        except Exception:
            return 0.0
        return float(t.user + t.system)

    def start(self) -> CpuMeter:
        self._t0, self._c0 = time.monotonic(), self.cpu()
        return self

    def stop(self) -> CpuMeter:
        self.wall_s = time.monotonic() - self._t0
        self.cpu_s = self.cpu() - self._c0
        return self


def cpus_busy_s(cpus: tuple[int, ...] | None) -> float:
    """Busy seconds (all processes) of these CPUs since boot, from /proc/stat; 0 when unknown."""
    if cpus is None:
        return 0.0
    total = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            for line in f:
                if not (line.startswith("cpu") and line[3].isdigit()):
                    continue
                name, *fields = line.split()
                if int(name[3:]) in cpus:
                    # user + nice + system: time of processes (irq/softirq time is charged to no process)
                    total += int(fields[0]) + int(fields[1]) + int(fields[2])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class RssSampler:
    """Samples a process's RSS in a thread; peak = max(samples, VmHWM)."""

    pid: int
    interval_s: float = 0.2
    peak_sampled: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        import psutil

        proc = psutil.Process(self.pid)

        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):
                    self.peak_sampled = max(self.peak_sampled, int(proc.memory_info().rss))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def vm_hwm(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        """Peak RSS in bytes (call while the process is still alive, for VmHWM)."""
        hwm = self.vm_hwm()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        return max(self.peak_sampled, hwm)


# -- JetStream ------------------------------------------------------------------


async def connect(url: str, user: str = "root$1", password: str = "memphis", **kw: Any) -> Any:
    import nats

    async def quiet(_exc: Exception) -> None:
        pass

    return await nats.connect(url, user=user, password=password, error_cb=quiet, max_reconnect_attempts=2,
                              connect_timeout=5, **kw)


async def ensure_stream(js: Any, name: str, max_bytes: int = -1) -> None:
    from nats.js.api import StreamConfig

    config = StreamConfig(name=name, subjects=[f"{name}.>"], max_bytes=max_bytes)
    try:
        await js.add_stream(config)
    except Exception:
        await js.update_stream(config)


async def stream_msgs(js: Any, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.messages)


async def prefill(nc: Any, js: Any, stream: str, subject: str, count: int, headers: dict[str, str] | None = None,
                  timeout_s: float = 60.0) -> float:
    """Put ``count`` more MSG_SIZE messages into ``stream`` fast; returns the seconds it took.

    Publishes in pipelined JetStream windows (acked, so nothing is lost to ingest limits)."""
    t0 = time.monotonic()
    target = await stream_msgs(js, stream) + count
    body = payload()
    js_async = nc.jetstream(publish_async_max_pending=4000)
    failures = 0

    def done(f: asyncio.Future[Any]) -> None:
        nonlocal failures
        if f.cancelled() or f.exception() is not None:
            failures += 1

    for _ in range(count):
        fut = await js_async.publish_async(subject, body, headers=dict(headers) if headers else None)
        fut.add_done_callback(done)
    await asyncio.wait_for(js_async.publish_async_completed(), timeout_s)
    have = await stream_msgs(js, stream)
    if have < target:
        raise RuntimeError(f"prefill of {stream}: {have} messages, wanted {target} ({failures} publishes failed)")
    return time.monotonic() - t0


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def python() -> str:
    return sys.executable
