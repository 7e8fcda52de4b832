"""The attack suite's processes: a real nats-server and the gateway as a SUBPROCESS.

Every test talks to the gateway only over its sockets, and measures the real process (RSS,
open connections, event-loop stalls) with psutil. A module may set ``GATEWAY_ARGS`` (extra
``serve`` flags) to get a gateway of its own shape; each module gets its own broker and gateway.

Each test prints ``FIGURE <name>: ...`` (pytest shows it with ``-s`` or ``-rA``, and for every
failure); with ``SECURITY_FIGURES=<file>`` the figures are also appended to that file as JSON
lines, for the README's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import psutil
import pytest
from memgw.v1 import auth_pb2, auth_pb2_grpc, consume_pb2_grpc, produce_pb2_grpc

from gateway.embedded.server import EmbeddedBroker

REPO = Path(__file__).resolve().parents[3]
ROOT_USER = "root"
ROOT_PASSWORD = "Att4ck-pw-51c0de"  # distinctive: tests look for it in answers
JWT_SECRET = "attack-suite-jwt-secret-" + "k" * 24
MB = 1024 * 1024


# ---------------------------------------------------------------- figures

def figure(name: str, text: str, **values: Any) -> None:
    """Print one figure line (and append it to $SECURITY_FIGURES as JSON)."""
    print(f"FIGURE {name}: {text}", flush=True)
    path = os.environ.get("SECURITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"figure": name, "text": text, **values}) + "\n")


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so an interrupted run leaves no gateway."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class GatewayProcess:
    """``python -m gateway serve`` of this checkout, as a child process on loopback ports."""

    def __init__(self, broker_url: str | None, data_dir: Path, extra_args: list[str],
                 env: dict[str, str] | None = None, secrets_in_argv: bool = True) -> None:
        """``broker_url`` None: the embedded broker (on a free port). ``secrets_in_argv`` False: no
        --root-password/--jwt-secret flags (give them through ``env``)."""
        self.broker_url = broker_url
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.env = env or {}
        self.secrets_in_argv = secrets_in_argv
        self.broker_port = free_port()
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.untouched = False
        self.log_path = data_dir / "gateway.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def argv(self) -> list[str]:
        broker = (["--broker", self.broker_url, "--control-plane"] if self.broker_url is not None
                  else ["--broker-port", str(self.broker_port)])
        secrets = ["--root-password", ROOT_PASSWORD, "--jwt-secret", JWT_SECRET] if self.secrets_in_argv else []
        return [
            sys.executable, "-m", "gateway", "serve", *broker,
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            *secrets,
            "--data-dir", str(self.data_dir / "gw"),
            "--log-level", "WARNING",
            *self.extra_args,
        ]

    async def start(self, timeout_s: float = 30) -> None:
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # e.g. a floor's nats-py
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*inherited, str(REPO), str(REPO / "generated")]))
        for name in [n for n in env if n.startswith("MEMPHIS_GATEWAY_")]:
            del env[name]
        env.update(self.env)
        self.popen = self._spawn(env)
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.popen.returncode}: {self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(self.base + "/monitoring/status") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                self.kill()
                raise RuntimeError(f"gateway did not answer within {timeout_s:g} s: {self.log_tail()}")
        # gRPC too
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 15)
        self.untouched = True  # no test has used this process yet

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(self.argv(), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def ensure(self) -> None:
        """Restart the gateway if an earlier attack killed it (same ports)."""
        if not self.alive():
            self.restarts += 1
            await self.start()

    def kill(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    async def stop(self) -> None:
        if self.popen is None or not self.alive():
            return
        self.popen.terminate()
        try:
            await asyncio.to_thread(self.popen.wait, 15)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def tcp(self, local_port: int | None = None, remote_port: int | None = None) -> int:
        """Open TCP connections of the gateway, optionally on its local port or to a remote port."""
        n = 0
        for c in self.process.net_connections(kind="tcp"):
            if c.status in (psutil.CONN_LISTEN, psutil.CONN_TIME_WAIT, psutil.CONN_CLOSE):
                continue
            if local_port is not None and (not c.laddr or c.laddr.port != local_port):
                continue
            if remote_port is not None and (not c.raddr or c.raddr.port != remote_port):
                continue
            n += 1
        return n

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class RssWatch:
    """Samples the gateway's RSS in a thread: the peak, and a SIGKILL when it passes ``cap`` bytes.

    The cap keeps a memory bomb from taking the shared machine down: a test whose attack reaches
    it has failed anyway, and ``killed`` says so in its figure."""

    def __init__(self, gw: GatewayProcess, cap_growth: int = 1536 * MB, every_s: float = 0.01) -> None:
        self.gw = gw
        self.proc = gw.process
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.cap = self.base + cap_growth
        self.every_s = every_s
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            if rss > self.cap:
                self.killed = True
                self.gw.kill()
                return
            time.sleep(self.every_s)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / MB

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def describe(self) -> str:
        text = f"rss +{self.growth_mb:.0f} MB (peak {self.peak / MB:.0f} MB)"
        return text + (f"; KILLED by the watchdog at +{(self.cap - self.base) / MB:.0f} MB" if self.killed else "")


class StallProbe:
    """GET / every ``every_s`` on its own connection; the worst latency is the event loop's stall."""

    def __init__(self, gw: GatewayProcess, every_s: float = 0.05) -> None:
        self.gw = gw
        self.every_s = every_s
        self.worst = 0.0
        self.failures = 0
        self._since: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            while True:
                t = self._since = time.monotonic()
                try:
                    async with http.get(self.gw.base + "/") as resp:
                        await resp.read()
                except (aiohttp.ClientError, OSError, TimeoutError):
                    self.failures += 1
                self._since = None
                self.worst = max(self.worst, time.monotonic() - t)
                await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> StallProbe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(self.every_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._since is not None:  # a probe still waiting counts as long as it has waited
            self.worst = max(self.worst, time.monotonic() - self._since)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ---------------------------------------------------------------- clients

class Api:
    """REST and gRPC clients of one gateway process."""

    def __init__(self, gw: GatewayProcess, http: aiohttp.ClientSession, channel: grpc.aio.Channel) -> None:
        self.gw = gw
        self.http = http
        self.channel = channel
        self.auth_rpc = auth_pb2_grpc.AuthServiceStub(channel)
        self.produce_rpc = produce_pb2_grpc.ProduceServiceStub(channel)
        self.consume_rpc = consume_pb2_grpc.ConsumeServiceStub(channel)
        self._tokens: dict[str, str] = {}

    async def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | str | None = None,
                      headers: dict[str, str] | None = None, token: str | None = None,
                      params: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        if isinstance(data, bytes) and len(data) > 512 * 1024:
            data = io.BytesIO(data)  # type: ignore[assignment] (aiohttp warns about big raw bytes)
        async with self.http.request(method, self.gw.base + path, data=data, headers=hdrs, params=params) as resp:
            raw = await resp.read()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            return resp.status, body, resp.headers

    async def post(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        return await self.request("POST", path, **kw)

    async def token(self, username: str = ROOT_USER, password: str = ROOT_PASSWORD) -> str:
        if username not in self._tokens:
            status, body, _ = await self.post("/auth/authenticate",
                                              json_body={"username": username, "password": password})
            assert status == 200, (status, body)
            self._tokens[username] = str(body["jwt"])
        return self._tokens[username]

    async def grpc_token(self, username: str = ROOT_USER) -> str:
        request = auth_pb2.AuthenticateRequest(username=username, password=ROOT_PASSWORD)
        reply = await self.auth_rpc.Authenticate(request)
        return str(reply.jwt)

    async def produce_text(self, station: str, text: str, headers: dict[str, str] | None = None,
                           params: dict[str, str] | None = None) -> tuple[int, Any]:
        hdrs = {"Content-Type": "text/plain", **(headers or {})}
        status, body, _ = await self.post(f"/stations/{station}/produce/single", data=text, headers=hdrs,
                                          token=await self.token(), params=params)
        return status, body

    async def consume(self, station: str, consumer: str = "c1", batch_size: int = 10,
                      wait_ms: int = 500, **extra: Any) -> tuple[int, Any]:
        status, body, _ = await self.post(
            f"/stations/{station}/consume/batch", token=await self.token(),
            json_body={"consumer_name": consumer, "batch_size": batch_size, "batch_max_wait_time_ms": wait_ms,
                       **extra})
        return status, body


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def root_nats(broker: EmbeddedBroker) -> nats.NATS:
    async def quiet(_err: Exception) -> None:
        return None
    return await nats.connect(broker.url, user=f"{ROOT_USER}$1", password=ROOT_PASSWORD, error_cb=quiet,
                              max_reconnect_attempts=-1, reconnect_time_wait=0.2)


async def streams_snapshot(nc: nats.NATS) -> dict[str, int]:
    """Every stream of the account -> its message count (the KV catalog included)."""
    js = nc.jetstream()
    return {s.config.name: s.state.messages for s in await js.streams_info()}


async def stored_messages(nc: nats.NATS, station: str) -> list[Any]:
    """Every message stored in partition 1 of ``station`` (raw, with its headers)."""
    js = nc.jetstream()
    stream = f"{station.lower().replace('.', '#')}$1"
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            out.append(await js.get_msg(stream, seq))
    return out


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedBroker]:
    b = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("nats"), port=0, root_password=ROOT_PASSWORD)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture(scope="module")
async def gateway(request: pytest.FixtureRequest, broker: EmbeddedBroker,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    extra = list(getattr(request.module, "GATEWAY_ARGS", []))
    gw = GatewayProcess(broker.url, tmp_path_factory.mktemp("gateway"), extra)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fresh_gateway: restart the gateway before the test (RSS measurements: "
                            "Python keeps what an earlier attack made it allocate)")


@pytest.fixture
async def gw(request: pytest.FixtureRequest, gateway: GatewayProcess) -> AsyncIterator[GatewayProcess]:
    """The module's gateway, restarted first if an earlier test's attack killed it (or if the test
    is marked ``fresh_gateway``)."""
    if request.node.get_closest_marker("fresh_gateway") is not None and not gateway.untouched:
        await gateway.stop()
    await gateway.ensure()
    gateway.untouched = False
    yield gateway


@pytest.fixture
async def api(gw: GatewayProcess) -> AsyncIterator[Api]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http, \
            grpc.aio.insecure_channel(gw.grpc_target) as channel:
        yield Api(gw, http, channel)


@pytest.fixture
async def nc(broker: EmbeddedBroker) -> AsyncIterator[nats.NATS]:
    client = await root_nats(broker)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def station(request: pytest.FixtureRequest) -> Iterator[str]:
    """A station name of this test's own (lower-case ASCII, unique in the module)."""
    name = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in request.node.originalname.lower())
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]  # parameters differing in case only
    yield f"{name.strip('-')[-50:].strip('-')}-{digest}"
