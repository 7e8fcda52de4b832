"""Connection-token mode end to end, with the embedded broker (issue 11).

Configured as the upstream's deployments configure it (``USER_PASS_BASED_AUTH=false`` +
``CONNECTION_TOKEN``) and with our names (``MEMPHIS_GATEWAY_AUTH_MODE=token`` +
``MEMPHIS_GATEWAY_CONNECTION_TOKEN``): the embedded nats-server runs with that authorization token,
callers authenticate with ``connection_token`` over REST and gRPC, produce and consume over both, a
wrong token is 401 / UNAUTHENTICATED, and memphis-py connects to the embedded broker with
``connection_token=`` and sees the gateway's messages (and the gateway sees its messages).
The Node SDK's ``connectionToken``: tests/system/test_node_sdk.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import nats
import pytest
from memgw.v1 import auth_pb2, consume_pb2, produce_pb2
from memphis import Headers, Memphis

from gateway.settings import load
from tests.harness import JWT_SECRET, Clients, bearer, jwt_payload, running_gateway

TOKEN = "Conn-t0ken-5b2d8e"  # distinctive: looked for in the issued tokens
UPSTREAM_NAMES = {"USER_PASS_BASED_AUTH": "false", "CONNECTION_TOKEN": TOKEN}
OUR_NAMES = {"MEMPHIS_GATEWAY_AUTH_MODE": "token", "MEMPHIS_GATEWAY_CONNECTION_TOKEN": TOKEN}


def token_settings(environ: Mapping[str, str], data_dir: Path):  # type: ignore[no-untyped-def]
    settings = load(dict(environ), {"http_port": 0, "grpc_port": 0, "broker_port": 0, "data_dir": data_dir,
                                    "jwt_secret": JWT_SECRET, "broker_timeout_s": 3.0})
    assert settings.embedded and settings.auth_mode == "token" and settings.connection_token == TOKEN
    return settings


@pytest.fixture(scope="module", params=["upstream-names", "our-names"])
async def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clients]:
    environ = UPSTREAM_NAMES if request.param == "upstream-names" else OUR_NAMES
    async with running_gateway(token_settings(environ, tmp_path_factory.mktemp("tok"))) as clients:
        yield clients


def broker_port(gw: Clients) -> int:
    assert gw.gateway.embedded is not None
    return gw.gateway.embedded.port


async def rest_login(gw: Clients, **body: object) -> tuple[int, dict[str, object]]:
    status, reply, _ = await gw.post("/auth/authenticate", {"username": "root", **body})
    return status, reply


async def test_authenticate_with_the_connection_token_over_rest_and_grpc(gw: Clients) -> None:
    status, body = await rest_login(gw, connection_token=TOKEN)
    assert status == 200, body
    for key in ("jwt", "jwt_refresh_token"):
        assert TOKEN.encode() not in jwt_payload(str(body[key]))  # sealed, never readable
    # the docs send both: the mode decides (token mode: the connection token counts)
    status, body = await rest_login(gw, password="whatever", connection_token=TOKEN)
    assert status == 200, body
    reply = await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username="root", connection_token=TOKEN))
    assert reply.jwt and reply.jwt_refresh_token
    assert TOKEN.encode() not in jwt_payload(reply.jwt)


async def test_a_wrong_connection_token_is_401_over_rest_and_unauthenticated_over_grpc(gw: Clients) -> None:
    status, body = await rest_login(gw, connection_token="not-" + TOKEN)
    assert status == 401, body
    assert body.get("message") == "Unauthorized"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username="root", connection_token="not-" + TOKEN))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # a password is no credential in token mode: a clear 400 naming the field wanted
    status, body = await rest_login(gw, password="memphis")
    assert status == 400 and "connection_token" in str(body), body


async def test_the_embedded_broker_wants_the_token(gw: Clients) -> None:
    async def quiet(_exc: Exception) -> None:
        return None

    url = f"nats://127.0.0.1:{broker_port(gw)}"
    for options in ({}, {"token": "not-" + TOKEN}, {"user": "root$1", "password": "memphis"}):
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2,
                               error_cb=quiet, **options)  # type: ignore[arg-type]
    nc = await nats.connect(url, token=TOKEN, allow_reconnect=False, error_cb=quiet)
    await nc.close()


async def test_produce_and_consume_over_rest_and_grpc(gw: Clients) -> None:
    station = f"tok-{uuid.uuid4().hex[:8]}"
    _, body = await rest_login(gw, connection_token=TOKEN)
    rest_jwt = str(body["jwt"])
    grpc_jwt = (await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username="root",
                                                                         connection_token=TOKEN))).jwt
    status, reply, _ = await gw.post(f"/stations/{station}/produce/single", raw=b'{"via": "rest"}', token=rest_jwt,
                                     headers={"Content-Type": "application/json", "X-Via": "rest"})
    assert status == 200, reply
    await gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station=station, body={"content_type": "text/plain", "data": b"via grpc"},
                                         headers={"X-Via": "grpc"}),
        metadata=bearer(grpc_jwt))
    status, got, _ = await gw.post(f"/stations/{station}/consume/batch",
                                   {"consumer_name": "r", "consumer_group": "rest", "batch_size": 10,
                                    "batch_max_wait_time_ms": 500}, token=grpc_jwt)
    assert status == 200, got
    assert [(m["message"], m["headers"]["X-Via"]) for m in got] == [('{"via": "rest"}', "rest"), ("via grpc", "grpc")]
    batch = await gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=station, consumer_name="g", consumer_group="grpc", batch_size=10,
                                        batch_max_wait_time_ms=500),
        metadata=bearer(rest_jwt))
    assert [m.message for m in batch.messages] == [b'{"via": "rest"}', b"via grpc"]


@pytest.fixture
async def sdk(gw: Clients) -> AsyncIterator[tuple[Memphis, list[object]]]:
    m = Memphis()
    await m.connect(host="127.0.0.1", port=broker_port(gw), username="root", connection_token=TOKEN,
                    timeout_ms=3000)
    consumers: list[object] = []
    yield m, consumers
    for consumer in consumers:  # memphis-py leaks these tasks (docs/memphis-py.md B7)
        for name in ("t_ping", "t_dls", "t_consume"):
            task = getattr(consumer, name, None)
            if task is not None:
                task.cancel()
    await m.close()


async def test_memphis_py_with_connection_token_sees_the_gateways_messages(
    gw: Clients, sdk: tuple[Memphis, list[object]]
) -> None:
    m, consumers = sdk
    station = f"tok-sdk-{uuid.uuid4().hex[:8]}"
    _, body = await rest_login(gw, connection_token=TOKEN)
    jwt = str(body["jwt"])
    status, reply, _ = await gw.post(f"/stations/{station}/produce/batch", ["a", "b"], token=jwt,
                                     headers={"X-Origin": "gateway"})
    assert status == 200, reply
    consumer = await m.consumer(station_name=station, consumer_name="sdk", consumer_group="sdk-group",
                                timeout_retries=0)
    consumers.append(consumer)
    msgs = await consumer.fetch(batch_size=10)
    assert [bytes(x.get_data()) for x in msgs] == [b'"a"', b'"b"']
    assert msgs[0].get_headers()["X-Origin"] == "gateway"
    for x in msgs:
        await x.ack()
    # and the other way: memphis-py produces, the gateway consumes (gRPC)
    producer = await m.producer(station_name=station, producer_name="sdk-producer", timeout_retries=0)
    headers = Headers()
    headers.add("X-Origin", "sdk")
    await producer.produce(bytearray(b"from-sdk"), headers=headers)
    batch = await gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=station, consumer_name="g", consumer_group="after-sdk",
                                        batch_size=10, batch_max_wait_time_ms=500),
        metadata=bearer(jwt))
    assert [m.message for m in batch.messages] == [b'"a"', b'"b"', b"from-sdk"]
    assert batch.messages[-1].headers["X-Origin"] == "sdk"


async def test_memphis_py_with_a_wrong_token_is_refused(gw: Clients) -> None:
    m = Memphis()
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await m.connect(host="127.0.0.1", port=broker_port(gw), username="root", connection_token="not-" + TOKEN,
                        timeout_ms=2000, reconnect=False)
