"""The README's quick start: `memphis-gateway serve` with its embedded broker, as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.processes import free_port, wait_http


def test_serve_help_lists_the_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--http-port", "--grpc-port", "--data-dir", "--broker", "--broker-port", "--control-plane",
                 "--root-user", "--root-password", "--jwt-secret"):
        assert flag in out


def test_bad_setting_fails_at_start_with_its_name() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve"], capture_output=True, text=True,
                          env={**os.environ, "MEMPHIS_GATEWAY_HTTP_PORT": "eighty"}, timeout=30)
    assert proc.returncode != 0 and "MEMPHIS_GATEWAY_HTTP_PORT" in proc.stderr


def test_embedded_serve_produces_consumes_and_stops_cleanly(tmp_path: Path) -> None:
    http, grpc_port, broker = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--http-port", str(http), "--grpc-port", str(grpc_port),
         "--broker-port", str(broker), "--data-dir", str(tmp_path / "data")],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        status, body = wait_http(f"http://127.0.0.1:{http}/monitoring/status", 30)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/auth/authenticate", method="POST",
            data=json.dumps({"username": "root", "password": "memphis"}).encode(),
            headers={"Content-Type": "application/json"})
        token = json.loads(urllib.request.urlopen(req, timeout=10).read())["jwt"]
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/stations/quick/produce/single", method="POST", data=b"hello",
            headers={"Content-Type": "text/plain", "Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read()) == {"error": None, "success": True}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read() if proc.stderr else ""
    assert "embedded nats-server" in log
    assert token not in log


def test_embedded_broker_with_the_development_password_refused_off_loopback(tmp_path: Path) -> None:
    """Nothing is bound: the check runs before any listener or broker starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMPHIS_GATEWAY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--host", "0.0.0.0", "--root-password", "memphis",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, env=env, timeout=30,
    )
    print(f"\n--host 0.0.0.0 with the development password: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    assert proc.returncode != 0
    assert "MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE" in proc.stderr and "refusing to start" in proc.stderr
    assert "--root-password on the command line is visible" in proc.stderr  # the flag warning, before it
    assert not (tmp_path / "data").exists()  # no broker was started


def test_a_port_clash_names_the_flag_to_change(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--http-port", "--grpc-port", "--broker-port"):
            ports = {f: str(free_port()) for f in ("--http-port", "--grpc-port", "--broker-port")}
            ports[flag] = str(port)
            proc = subprocess.run(
                [sys.executable, "-m", "gateway", "serve", *(x for kv in ports.items() for x in kv),
                 "--data-dir", str(tmp_path / flag.strip("-"))], capture_output=True, text=True, timeout=60)
            assert proc.returncode != 0
            assert flag in proc.stderr, proc.stderr[-2000:]
