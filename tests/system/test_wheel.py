"""The package as users install it: build the wheel, install it into a fresh venv, run `memphis-gateway serve`.

Every other test runs the editable install, which sees every source file; a subpackage missing from the
wheel (issue 11: gateway.servicers) only shows here. Dependencies come from the package index.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from tests.processes import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _post(url: str, body: bytes, headers: dict[str, str]) -> object:
    req = urllib.request.Request(url, method="POST", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.loads(resp.read())


def test_wheel_installs_and_serves(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=180, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("memphis_gateway-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("__init__.py")}
    assert packages <= set(names), f"missing from the wheel: {sorted(packages - set(names))}"
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # a clean environment: no PYTHONPATH (a source tree on it would make pip skip the install as "satisfied")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("MEMPHIS_GATEWAY_")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=240, env=env, cwd=tmp_path)
    assert (env_dir / "bin" / "memphis-gateway").exists()
    http, grpc_port, broker = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [str(env_dir / "bin" / "memphis-gateway"), "serve", "--http-port", str(http), "--grpc-port", str(grpc_port),
         "--broker-port", str(broker), "--data-dir", str(tmp_path / "data")],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )
    try:
        status, _ = wait_http(f"http://127.0.0.1:{http}/monitoring/status", 60)
        assert status == 200, proc.stderr.read() if proc.poll() is not None and proc.stderr else status
        base = f"http://127.0.0.1:{http}"
        auth = _post(f"{base}/auth/authenticate", b'{"username": "root", "password": "memphis"}',
                     {"Content-Type": "application/json"})
        token = auth["jwt"]  # type: ignore[index]
        bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        assert _post(f"{base}/stations/wheel/produce/single", b'{"n": 1}', bearer) == {"error": None, "success": True}
        got = _post(f"{base}/stations/wheel/consume/batch",
                    b'{"consumer_name": "c", "batch_size": 5, "batch_max_wait_time_ms": 1000}', bearer)
        assert [m["message"] for m in got] == ['{"n": 1}']  # type: ignore[union-attr,index]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
