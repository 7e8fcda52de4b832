"""The Node SDK (``memphis-dev`` from npm, unmodified) with ``connectionToken`` against the gateway's embedded
broker in connection-token mode (``USER_PASS_BASED_AUTH=false`` + ``CONNECTION_TOKEN``, issue 11).

The SDK needs Memphis's control plane (``$memphis_producer_creations``, ``$memphis_consumer_creations``, ...),
which the gateway answers for its embedded broker. tests/system/node/sdk_roundtrip.js connects with
``connectionToken``, produces one message with a header, and fetches what is in the station: the gateway's
message (produced over REST before) and its own. Then the gateway consumes the SDK's message over REST and gRPC.
tests/system/node/sdk_dls.js checks schemas and dead letters made through the gateway's API: a JSON schema
refusing the SDK's bad message (reported to the dead-letter store), and a message the SDK's consumer group never
acknowledges, given up after max deliveries (a poison message); both listed over REST.

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
DLS_SCRIPT = Path(__file__).parent / "node" / "sdk_dls.js"
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


async def run_node(modules: Path, *args: str, script: Path = SCRIPT) -> dict[str, object]:
    env = {**os.environ, "NODE_PATH": str(modules)}
    proc = await asyncio.create_subprocess_exec(shutil.which("node") or "node", str(script), *args, env=env,
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


async def test_node_sdk_schema_refusal_and_poison_message_in_the_dls(node_modules: Path, tmp_path: Path) -> None:
    settings = load({"USER_PASS_BASED_AUTH": "false", "CONNECTION_TOKEN": TOKEN},
                    {"http_port": 0, "grpc_port": 0, "broker_port": 0, "data_dir": tmp_path / "data",
                     "jwt_secret": JWT_SECRET, "broker_timeout_s": 3.0})
    station, schema = f"node-dl-{uuid.uuid4().hex[:8]}", f"node-sc-{uuid.uuid4().hex[:8]}"
    async with running_gateway(settings) as gw:
        assert gw.gateway.embedded is not None
        status, body, _ = await gw.post("/auth/authenticate", {"username": "root", "connection_token": TOKEN})
        assert status == 200, body
        jwt = body["jwt"]
        definition = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
        status, body, _ = await gw.post("/schemas", {"name": schema, "type": "json", "definition": definition},
                                        token=jwt)
        assert status == 200, body
        status, body, _ = await gw.post("/stations", {"name": station, "schema_name": schema,
                                                      "dls": {"poison": True, "schemaverse": True}}, token=jwt)
        assert status == 200, body

        result = await run_node(node_modules, "127.0.0.1", str(gw.gateway.embedded.port), TOKEN, station,
                                script=DLS_SCRIPT)
        assert result["returncode"] == 0, result
        assert "Schema validation has failed" in str(result["refused"]), result
        assert result["fetched"] == [['{"a": 1}'], ['{"a": 1}'], []], result  # delivered twice, then given up

        letters: list[dict[str, object]] = []
        async with asyncio.timeout(10):
            while len(letters) < 2:
                status, body, _ = await gw.get(f"/stations/{station}/dls", token=jwt)
                assert status == 200, body
                letters = body["dead_letters"]
                await asyncio.sleep(0.2)
        by_reason = {d["reason"]: d for d in letters}
        assert set(by_reason) == {"schema", "poison"}, letters
        refusal, poison = by_reason["schema"], by_reason["poison"]
        assert refusal["message"] == '{"b": 1}' and refusal["producer_name"] == "node-producer", refusal
        assert "required" in str(refusal["validation_error"]), refusal
        assert poison["message"] == '{"a": 1}' and poison["consumer_group"] == "node-poison", poison
        assert poison["deliveries"] == 2, poison
