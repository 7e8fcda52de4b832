"""The container image, built from the Dockerfile and run with podman, as an operator would.

Needs root, podman and (unless MEMGW_IMAGE_BASE names a reachable base image) debootstrap: with no
image registry reachable the base is built from Debian packages by scripts/build-base-image.sh
(cached in podman, keyed by a hash of the script). Missing tools fail the test, they never skip it.
Not part of the default run (pyproject's addopts ignore this file): run it by path,

    sudo .venv/bin/python -m pytest tests/system/test_image.py

Checks: the image has its HEALTHCHECK and runs as uid 10001; the container, with its ports
published on 127.0.0.1 only and a named volume, becomes healthy (and unhealthy while its broker is
frozen); REST and gRPC authenticate, produce and consume through the published ports; the broker's
data is in the volume and a message produced before a restart is consumed after it. The container
and volume the test created are always removed (by name); the images stay as the build cache.

Environment: MEMGW_IMAGE_BASE (default: the local Debian base, localhost/memgw-base:py311),
MEMGW_IMAGE_TAG (default localhost/memphis-gateway:systemtest).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from memgw.v1 import auth_pb2, auth_pb2_grpc, consume_pb2, consume_pb2_grpc, produce_pb2, produce_pb2_grpc

from tests.system.conftest import NOTES, TIMINGS

pytestmark = pytest.mark.timeout(1200)

REPO = Path(__file__).resolve().parents[2]
BASE_SCRIPT = REPO / "scripts" / "build-base-image.sh"
LOCAL_BASE = "localhost/memgw-base:py311"
BASE = os.environ.get("MEMGW_IMAGE_BASE") or LOCAL_BASE
TAG = os.environ.get("MEMGW_IMAGE_TAG") or "localhost/memphis-gateway:systemtest"
UID = 10001
DATA = "/var/lib/memphis-gateway"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # lent to pip during the build (TLS-intercepting proxies)


def _tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {why} (Debian/Ubuntu: apt-get install {name})", pytrace=False)
    return path


def _run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(args)}` exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-4000:]}", pytrace=False)
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Podman:
    """podman plus what this machine needs to run containers (found by probing, see ``_podman``)."""

    exe: str
    global_args: list[str] = field(default_factory=list)
    ulimits: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.exe, *self.global_args, *args, timeout=timeout, check=check)


def _ulimit_args() -> list[str]:
    # Podman < 5 asks the runtime for RLIMIT_NOFILE/NPROC = 1048576 when run as root, whether or not
    # it holds CAP_SYS_RESOURCE to raise them (later versions clamp to the caller's limits). Without
    # that capability ask for what we have: the open-file limit of this process, and 4096 processes
    # (the gateway and its nats-server use a few dozen threads).
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1048576)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def _podman(base: str) -> Podman:
    """Run ``true`` in ``base``; on the failures of restricted sandboxes apply their known remedy and retry.

    - ``setrlimit ... Operation not permitted``: no CAP_SYS_RESOURCE -> explicit ``--ulimit``s;
    - crun's ``cgroups in hybrid mode not supported`` (cgroup v1 with a controller left on the v2
      hierarchy) -> ``--runtime runc``, which supports that layout.
    Anything else fails the test with podman's message.
    """
    podman = Podman(_tool("podman", "the image test builds and runs the image with podman"))
    for _ in range(3):
        proc = podman("run", "--rm", *podman.ulimits, base, "true", check=False)
        if proc.returncode == 0:
            return podman
        err = proc.stderr
        if ("setrlimit" in err or "error setting rlimit" in err) and not podman.ulimits:
            podman.ulimits = _ulimit_args()
            NOTES.append(f"podman: runtime refused the default rlimits ({err.strip().splitlines()[-1]}); "
                         f"using {' '.join(podman.ulimits)}")
        elif "hybrid mode not supported" in err and not podman.global_args:
            _tool("runc", "crun cannot run containers on this cgroup v1/v2 hybrid host; runc can")
            podman.global_args = ["--runtime", "runc"]
            NOTES.append(f"podman: crun refused ({err.strip().splitlines()[-1]}); using --runtime runc")
        else:
            break
    pytest.fail(f"podman cannot run a container here: `podman run --rm {base} true` exited "
                f"{proc.returncode}:\n{proc.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def podman() -> Podman:
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (rootful podman; debootstrap for the local base): run it with sudo",
                    pytrace=False)
    _tool("podman", "the image test builds and runs the image with podman")
    if BASE == LOCAL_BASE:
        _tool("debootstrap", "no registry reachable: the base image is built from Debian packages")
        started = time.monotonic()
        proc = _run("sh", str(BASE_SCRIPT), LOCAL_BASE, timeout=900)
        TIMINGS["base image (debootstrap + import)"] = time.monotonic() - started
        NOTES.append(proc.stdout.strip().splitlines()[-1])
    return _podman(BASE)


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    previous = podman("image", "inspect", "--format", "{{.Id}}", TAG, check=False).stdout.strip()
    args = ["build", "--format", "docker", *podman.ulimits, "--build-arg", f"BASE={BASE}", "-t", TAG]
    if HOST_CA.is_file():
        args += ["-v", f"{HOST_CA}:/run/build-ca.pem:ro"]
    started = time.monotonic()
    podman(*args, str(REPO), timeout=900)
    TIMINGS["image build"] = time.monotonic() - started
    current = podman("image", "inspect", "--format", "{{.Id}}", TAG).stdout.strip()
    if previous and previous != current:
        podman("rmi", previous, check=False)  # our own previous build, now untagged
    return TAG


@dataclass
class Container:
    name: str
    volume: str
    rest: str
    grpc_target: str
    root_password: str
    started: float  # time.monotonic() at podman run

    def token(self) -> str:
        status, body = http(self.rest + "/auth/authenticate", {"username": "root", "password": self.root_password})
        assert status == 200, body
        return str(body["jwt"])


def http(url: str, body: Any = None, *, token: str | None = None, raw: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            status, text = err.code, err.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_healthy(podman: Podman, name: str, limit_s: float = 90) -> float:
    """Run the image's HEALTHCHECK (``podman healthcheck run``) until it passes; the seconds it took.

    Podman schedules health checks with systemd timers; where there is no systemd (containers,
    sandboxes) nothing runs them on their own, so the test runs them, as often as it likes.
    """
    started = time.monotonic()
    while True:
        proc = podman("healthcheck", "run", name, check=False)
        if proc.returncode == 0:
            return time.monotonic() - started
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running" or time.monotonic() - started > limit_s:
            logs = podman("logs", "--tail", "40", name, check=False)
            pytest.fail(f"{name} not healthy after {time.monotonic() - started:.1f} s (state {state}, "
                        f"healthcheck: {proc.stdout.strip()} {proc.stderr.strip()})\n{logs.stdout}{logs.stderr}",
                        pytrace=False)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def container(podman: Podman, image: str) -> Iterator[Container]:
    suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
    name, volume = f"memgw-systemtest-{suffix}", f"memgw-systemtest-data-{suffix}"
    http_port, grpc_port = _free_port(), _free_port()
    root_password = "pw-" + secrets.token_urlsafe(12)
    podman("volume", "create", volume)
    try:
        started = time.monotonic()
        podman("run", "-d", "--name", name, *podman.ulimits,
               "-p", f"127.0.0.1:{http_port}:4444", "-p", f"127.0.0.1:{grpc_port}:50051",
               "-v", f"{volume}:{DATA}",
               "-e", f"MEMPHIS_GATEWAY_ROOT_PASSWORD={root_password}",
               "-e", f"MEMPHIS_GATEWAY_JWT_SECRET={secrets.token_urlsafe(36)}",
               image, timeout=120)
        TIMINGS["podman run -d"] = time.monotonic() - started
        TIMINGS["started -> healthy"] = wait_healthy(podman, name)
        TIMINGS["podman run -> healthy"] = time.monotonic() - started
        yield Container(name, volume, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", root_password, started)
    finally:
        podman("rm", "--force", "--time", "5", name, check=False, timeout=120)
        podman("volume", "rm", "--force", volume, check=False)


def processes(podman: Podman, name: str) -> list[tuple[int, int, list[str]]]:
    """(pid, uid, argv) of every process in the container but the shell listing them."""
    script = ('for p in /proc/[0-9]*; do printf "%s %s %s\\n" "${p#/proc/}" "$(grep ^Uid: $p/status | cut -f2)" '
              '"$(tr "\\0" " " < $p/cmdline)"; done')
    found = []
    for line in podman("exec", name, "sh", "-c", script).stdout.splitlines():
        pid, uid, *argv = line.split()
        if argv and argv[:2] != ["sh", "-c"]:
            found.append((int(pid), int(uid), argv))
    return found


def test_image_metadata(podman: Podman, image: str) -> None:
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    health = json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["memphis-gateway", "serve"]
    assert DATA in config["Volumes"]
    assert {"4444/tcp", "50051/tcp"} <= set(config["ExposedPorts"])
    # kept only in the docker format: an OCI-format build would silently lose it
    assert health and health["Test"][0] == "CMD" and "/monitoring/status" in health["Test"][-1]


def test_healthy_and_published_on_loopback_only(podman: Podman, container: Container) -> None:
    assert podman("inspect", "--format", "{{.State.Health.Status}}", container.name).stdout.strip() == "healthy"
    ports = podman("port", container.name).stdout.split()
    published = [p for p in ports if ":" in p]
    assert published and all(p.startswith("127.0.0.1:") for p in published), ports
    status, body = http(container.rest + "/monitoring/status")
    assert status == 200, body


def test_runs_as_uid_10001(podman: Podman, container: Container) -> None:
    assert podman("exec", container.name, "id", "-u").stdout.strip() == str(UID)
    assert podman("exec", container.name, "id", "-g").stdout.strip() == str(UID)
    # every process: the gateway (PID 1) and its nats-server
    procs = processes(podman, container.name)
    commands = {pid: " ".join(argv) for pid, _, argv in procs}
    assert commands[1].endswith("/memphis-gateway serve"), commands
    assert any(argv[0].endswith("/nats-server") for _, _, argv in procs), commands
    assert {uid for _, uid, _ in procs} == {UID}, procs


def test_rest_authenticate_produce_consume(container: Container) -> None:
    status, body = http(container.rest + "/auth/authenticate", {"username": "root", "password": "memphis"})
    assert status == 401, body  # the development default is not the password we set
    token = container.token()
    payload = f'{{"id": "{secrets.token_hex(4)}"}}'.encode()
    status, body = http(container.rest + "/stations/rest-orders/produce/single", raw=payload, token=token)
    assert (status, body) == (200, {"error": None, "success": True})
    status, body = http(container.rest + "/stations/rest-orders/consume/batch", token=token,
                         body={"consumer_name": "c1", "batch_size": 10, "batch_max_wait_time_ms": 1000})
    assert status == 200, body
    assert [m["message"] for m in body] == [payload.decode()]


def test_grpc_authenticate_produce_consume(container: Container) -> None:
    payload = f"grpc-{secrets.token_hex(8)}".encode()
    with grpc.insecure_channel(container.grpc_target) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel).Authenticate(
            auth_pb2.AuthenticateRequest(username="root", password=container.root_password), timeout=15)
        md = (("authorization", f"Bearer {auth.jwt}"),)
        produce_pb2_grpc.ProduceServiceStub(channel).ProduceSingle(produce_pb2.ProduceSingleRequest(
            station="grpc-orders", body={"content_type": "text/plain", "data": payload},
            headers={"X-Source": "grpc"}), metadata=md, timeout=15)
        batch = consume_pb2_grpc.ConsumeServiceStub(channel).ConsumeBatch(consume_pb2.ConsumeBatchRequest(
            station="grpc-orders", consumer_name="c1", batch_size=10, batch_max_wait_time_ms=1000),
            metadata=md, timeout=15)
    assert [(m.message, m.headers["X-Source"]) for m in batch.messages] == [(payload, "grpc")]


def test_healthcheck_fails_while_the_broker_is_frozen(podman: Podman, container: Container) -> None:
    # the check must be able to fail: stop the embedded nats-server (SIGSTOP), then let it go
    pids = [str(pid) for pid, _, argv in processes(podman, container.name) if argv[0].endswith("/nats-server")]
    assert len(pids) == 1, pids
    podman("exec", container.name, "sh", "-c", f"kill -STOP {pids[0]}")
    try:
        # failures count once the start period (20 s) is over; after --retries (3) of them the
        # container is unhealthy. A check fails as "unhealthy" (exit 1: /monitoring/status answered
        # 503, or the probe's own 2 s timeout fired) or, on a loaded machine, as podman's
        # "exceeded timeout of 3s" (exit 125).
        time.sleep(max(0.0, container.started + 21 - time.monotonic()))
        results = [podman("healthcheck", "run", container.name, check=False, timeout=30) for _ in range(3)]
        assert all(proc.returncode != 0 for proc in results), results
        health = json.loads(podman("inspect", "--format", "{{json .State.Health}}", container.name).stdout)
        assert health["Status"] == "unhealthy" and health["FailingStreak"] >= 3, health
    finally:
        podman("exec", container.name, "sh", "-c", f"kill -CONT {pids[0]}")
    TIMINGS["broker thawed -> healthy"] = wait_healthy(podman, container.name)


def test_data_in_the_volume_survives_a_restart(podman: Podman, container: Container) -> None:
    token = container.token()
    payload = f"before-restart-{secrets.token_hex(4)}"
    status, body = http(container.rest + "/stations/durable/produce/single", raw=payload.encode(), token=token,
                        content_type="text/plain")
    assert status == 200, body

    mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", container.volume).stdout.strip())
    assert (mountpoint / "jetstream").is_dir(), sorted(p.name for p in mountpoint.iterdir())
    assert mountpoint.stat().st_uid == UID and (mountpoint / "jetstream").stat().st_uid == UID

    started = time.monotonic()
    podman("stop", "--time", "15", container.name, timeout=60)
    stop_s = time.monotonic() - started
    TIMINGS["stop (SIGTERM -> exited)"] = stop_s
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
    assert exit_code == "0" and stop_s < 12, (exit_code, stop_s)  # drained on SIGTERM, not killed

    started = time.monotonic()
    podman("start", container.name, timeout=60)
    wait_healthy(podman, container.name)
    TIMINGS["restart -> healthy"] = time.monotonic() - started

    status, body = http(container.rest + "/stations/durable/consume/batch", token=container.token(),
                        body={"consumer_name": "c1", "batch_size": 10, "batch_max_wait_time_ms": 1000})
    assert status == 200, body
    assert [m["message"] for m in body] == [payload]
