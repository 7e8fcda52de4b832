"""The one harness for free ports and child processes: a gateway as users run it (``python -m gateway serve``).

System tests start gateways through :func:`spawn_gateway` and stop only what they started,
by handle (:meth:`GatewayProcess.stop`).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.harness import JWT_SECRET

STARTUP_S = 30.0


def free_port() -> int:
    """A free TCP port on loopback (free now; a test uses it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_http(url: str, timeout: float) -> tuple[int, bytes]:
    """The first answer of ``url`` (any status), retrying while nothing listens, up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    http: int
    grpc: int
    broker_port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def open_from(self, ports: set[int]) -> int:
        """How many of the gateway's HTTP connections come from these client ports."""
        return sum(1 for c in psutil.Process(self.proc.pid).net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == self.http and c.raddr and c.raddr.port in ports)

    def broker_pid(self) -> int:
        match = re.search(r"embedded nats-server pid (\d+)", self.log_text())
        assert match, self.log_text()
        return int(match.group(1))

    async def exit_code(self, within: float) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), within)

    async def ready(self, within: float = STARTUP_S) -> GatewayProcess:
        """Wait until /monitoring/status answers 200 (fails with the log if the process exits)."""
        deadline = time.monotonic() + within
        while True:
            assert self.proc.poll() is None, self.log_text()
            try:
                status, _ = await asyncio.to_thread(wait_http, self.base + "/monitoring/status", 0)
                if status == 200:
                    return self
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log_text()
            await asyncio.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM this process (only it), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_gateway(data_dir: Path, log: Path, *flags: str, env: dict[str, str] | None = None,
                  command: Sequence[str] = (sys.executable, "-m", "gateway")) -> GatewayProcess:
    """``<command> serve`` on free loopback ports (REST, gRPC, embedded broker), output to ``log``."""
    http, grpc_port, broker = free_port(), free_port(), free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*command, "serve", "--http-port", str(http), "--grpc-port", str(grpc_port),
             "--broker-port", str(broker), "--data-dir", str(data_dir), *flags],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "MEMPHIS_GATEWAY_JWT_SECRET": JWT_SECRET, **(env or {})},
        )
    return GatewayProcess(proc, http, grpc_port, broker, log)
