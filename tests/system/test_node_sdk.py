"""The Node SDK (``memphis-dev`` from npm, unmodified) with ``connectionToken`` against the gateway's embedded
broker in connection-token mode (``USER_PASS_BASED_AUTH=false`` + ``CONNECTION_TOKEN``, issue 11).

The SDK needs Memphis's control plane (``$memphis_producer_creations``, ``$memphis_consumer_creations``, ...),
which the gateway answers for its embedded broker. tests/system/node/sdk_roundtrip.js connects with
``connectionToken``, produces one message with a header, and fetches what is in the station: the gateway's
message (produced over REST before) and its own. Then the gateway consumes the SDK's message over REST and gRPC.

npm installs ``memphis-dev@1.3.2`` into a temporary directory (about 15 s). ``underscore`` is installed
with it: ``avro-js`` 1.12 (a dependency of memphis-dev, ``^1.11.2``) requires it without declaring it, and
without it ``require('memphis-dev')`` fails with ``Cannot find module 'underscore'``. Needs ``node`` and
``npm`` and the npm registry; fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from memgw.v1 import consume_pb2

from gateway.settings import load
from tests.harness import JWT_SECRET, bearer, running_gateway

pytestmark = pytest.mark.timeout(240)
SCRIPT = Path(__file__).parent / "node" / "sdk_roundtrip.js"
PACKAGES = ("memphis-dev@1.3.2", "underscore@1.13")
TOKEN = "Node-conn-t0ken-41ac"


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the Node SDK test needs node and npm (Debian: apt-get install nodejs npm)"
    where = tmp_path_factory.mktemp("node-sdk")
    (where / "package.json").write_text('{"name": "memgw-node-sdk-test", "private": true}\n')
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *PACKAGES],
                          cwd=where, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"npm install {' '.join(PACKAGES)} failed:\n{done.stdout}\n{done.stderr}"
    return where / "node_modules"


async def run_node(modules: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "NODE_PATH": str(modules)}
    proc = await asyncio.create_subprocess_exec(shutil.which("node") or "node", str(SCRIPT), *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the Node SDK script did not finish within 60 s") from None
    lines = out.decode().strip().splitlines()
    assert lines, f"node printed nothing (exit {proc.returncode}):\n{err.decode()[-3000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    result["returncode"] = proc.returncode
    return result


async def test_node_sdk_with_connection_token_talks_to_the_gateway(node_modules: Path, tmp_path: Path) -> None:
    settings = load({"USER_PASS_BASED_AUTH": "false", "CONNECTION_TOKEN": TOKEN},
                    {"http_port": 0, "grpc_port": 0, "broker_port": 0, "data_dir": tmp_path / "data",
                     "jwt_secret": JWT_SECRET, "broker_timeout_s": 3.0})
    station = f"node-{uuid.uuid4().hex[:8]}"
    async with running_gateway(settings) as gw:
        assert gw.gateway.embedded is not None
        port = str(gw.gateway.embedded.port)
        status, body, _ = await gw.post("/auth/authenticate", {"username": "root", "connection_token": TOKEN})
        assert status == 200, body
        jwt = body["jwt"]
        status, body, _ = await gw.post(f"/stations/{station}/produce/single", raw=b"from-gateway", token=jwt,
                                        headers={"Content-Type": "text/plain", "X-Origin": "gateway"})
        assert status == 200, body

        result = await run_node(node_modules, "127.0.0.1", port, TOKEN, station)
        assert result["returncode"] == 0, result
        seen = result["seen"]
        assert isinstance(seen, list)
        assert [m["data"] for m in seen] == ["from-gateway", "from-node"]
        assert seen[0]["headers"]["X-Origin"] == "gateway" and seen[1]["headers"]["X-Origin"] == "node"

        status, got, _ = await gw.post(f"/stations/{station}/consume/batch",
                                       {"consumer_name": "gw", "batch_size": 10, "batch_max_wait_time_ms": 500},
                                       token=jwt)
        assert status == 200, got
        assert [(m["message"], m["headers"]["X-Origin"]) for m in got] == [("from-gateway", "gateway"),
                                                                          ("from-node", "node")]
        batch = await gw.consume.ConsumeBatch(
            consume_pb2.ConsumeBatchRequest(station=station, consumer_name="g", consumer_group="grpc", batch_size=10,
                                            batch_max_wait_time_ms=500), metadata=bearer(jwt))
        assert [m.message for m in batch.messages] == [b"from-gateway", b"from-node"]

        # a wrong token: the SDK's connect is refused by the embedded broker
        refused = await run_node(node_modules, "127.0.0.1", port, "not-" + TOKEN, station)
        assert refused["returncode"] == 1 and "authorization" in str(refused.get("error", "")).lower(), refused
