"""Users, roles and API keys on a gateway with its embedded broker, over REST, gRPC and memphis-py."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from memgw.v1 import access_pb2, access_pb2_grpc, consume_pb2, produce_pb2
from memphis import Memphis

from tests.harness import Clients, bearer, running_gateway, settings_for

PASSWORD = "pw-" + "s" * 12


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clients]:
    settings = settings_for("", tmp_path_factory.mktemp("access"), control_plane=False, broker_port=0)
    async with running_gateway(settings) as clients:
        yield clients


async def login(gw: Clients, username: str, password: str = PASSWORD) -> str:
    status, body, _ = await gw.post("/auth/authenticate", {"username": username, "password": password})
    assert status == 200, body
    return str(body["jwt"])


async def make_user(gw: Clients, root: str, username: str, produce: list[str], consume: list[str],
                    type_: str = "application") -> str:
    status, body, _ = await gw.post("/users", {"username": username, "password": PASSWORD, "type": type_,
                                               "permissions": {"produce": produce, "consume": consume}}, token=root)
    assert status == 200, body
    return await login(gw, username)


def produce(gw: Clients, station: str, token: str, data: bytes = b"x", *,
            query: bool = False) -> Any:
    if query:
        return gw.post(f"/stations/{station}/produce/single?authorization={token}", raw=data,
                       headers={"Content-Type": "text/plain"})
    return gw.post(f"/stations/{station}/produce/single", raw=data, token=token,
                   headers={"Content-Type": "text/plain"})


def consume(gw: Clients, station: str, token: str) -> Any:
    return gw.post(f"/stations/{station}/consume/batch", {"consumer_name": "c", "consumer_group": "g",
                                                          "batch_size": 10, "batch_max_wait_time_ms": 200},
                   token=token)


async def grpc_code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_disjoint_users_over_rest_and_grpc(gw: Clients) -> None:
    root = await gw.rest_token()
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    alice = await make_user(gw, root, "alice1", [a], [a])
    bob = await make_user(gw, root, "bob1", [b], [b])
    assert (await produce(gw, a, alice))[0] == 200
    assert (await produce(gw, b, bob))[0] == 200
    status, body, _ = await produce(gw, a, bob)
    assert status == 403 and body == {"error": f"user bob1 may not produce to station {a}", "success": False}
    status, body, _ = await consume(gw, a, bob)
    assert status == 403 and body["error"] == f"user bob1 may not consume from station {a}"
    status, body, _ = await consume(gw, a, alice)
    assert status == 200 and len(body) == 1, body
    # gRPC: the same checks, the same message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(station=a), metadata=bearer(bob))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"user bob1 may not produce to station {a}"
    code = await grpc_code(gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=a, consumer_name="c", batch_max_wait_time_ms=100),
        metadata=bearer(bob)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code = await grpc_code(gw.consume.Ack(consume_pb2.AckRequest(station=a, ack_ids=["x"]), metadata=bearer(bob)))
    assert code == grpc.StatusCode.PERMISSION_DENIED

    # a produce stream checks every frame's station
    async def frames() -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
        yield produce_pb2.ProduceStreamRequest(station=b, messages=[produce_pb2.ProducedMessage(data=b"1")])
        yield produce_pb2.ProduceStreamRequest(station=a, messages=[produce_pb2.ProducedMessage(data=b"2")])

    code = await grpc_code(gw.produce.ProduceStream(frames(), metadata=bearer(bob)))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_application_users_get_403_on_management(gw: Clients) -> None:
    root = await gw.rest_token()
    app = await make_user(gw, root, "app2", ["*"], ["*"])
    for status, body, _ in (
        await gw.get("/users", token=app),
        await gw.post("/users", {"username": "x", "password": "y"}, token=app),
        await gw.post("/api-keys", {"name": "k", "stations": ["*"], "actions": ["produce"]}, token=app),
    ):
        assert status == 403, body
        assert "user app2 may not manage" in body["error"]
    stub = access_pb2_grpc.UserServiceStub(gw.channel)
    code = await grpc_code(stub.ListUsers(access_pb2.ListUsersRequest(), metadata=bearer(app)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # a management user manages users, over both protocols
    mgr = await make_user(gw, root, "mgr2", [], [], type_="management")
    reply = await stub.CreateUser(access_pb2.CreateUserRequest(
        username="made-by-mgr", password=PASSWORD, permissions=access_pb2.Permissions(produce=["p"])),
        metadata=bearer(mgr))
    assert reply.user.permissions.produce == ["p"] and reply.user.type == "application"
    status, body, _ = await gw.get("/users/made-by-mgr", token=mgr)
    assert status == 200 and body["username"] == "made-by-mgr" and "password" not in str(body), body
    status, body, _ = await gw.get("/users", token=mgr)
    assert "made-by-mgr" in [u["username"] for u in body["users"]]
    async with gw.http.delete(gw.base + "/users/made-by-mgr", headers={"Authorization": f"Bearer {mgr}"}) as r:
        assert r.status == 200
    status, body, _ = await gw.get("/users/made-by-mgr", token=mgr)
    assert status == 404


async def test_deleting_a_user_revokes_its_tokens(gw: Clients) -> None:
    root = await gw.rest_token()
    st = f"d-{uuid.uuid4().hex[:6]}"
    carol = await make_user(gw, root, "carol3", [st], [])
    assert (await produce(gw, st, carol))[0] == 200
    async with gw.http.delete(gw.base + "/users/carol3", headers={"Authorization": f"Bearer {root}"}) as r:
        assert r.status == 200
    assert (await produce(gw, st, carol))[0] == 401
    # changing the password (re-creating) revokes the old tokens too, not the new ones
    dave = await make_user(gw, root, "dave3", [st], [])
    new = await make_user(gw, root, "dave3", [st], [])
    assert (await produce(gw, st, dave))[0] == 401
    assert (await produce(gw, st, new))[0] == 200


async def test_api_key_scoped_to_produce_on_one_station(gw: Clients, caplog: pytest.LogCaptureFixture) -> None:
    root = await gw.rest_token()
    st, other = f"k-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        status, body, _ = await gw.post("/api-keys", {"name": "webhook", "stations": [st], "actions": ["produce"],
                                                      "expires_in_minutes": 60}, token=root)
    assert status == 200, body
    key, key_id = body["key"], body["id"]
    assert key.startswith(f"mgw_{key_id}_") and body["expires_at"]
    assert key not in caplog.text and f"created API key {key_id}" in caplog.text
    assert (await produce(gw, st, key))[0] == 200
    assert (await produce(gw, st, key, query=True))[0] == 200
    code = await grpc_code(gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station=st), metadata=bearer(key)))
    assert code != grpc.StatusCode.PERMISSION_DENIED and code != grpc.StatusCode.UNAUTHENTICATED
    status, body, _ = await produce(gw, other, key)
    assert status == 403 and body["error"] == f"API key {key_id} (user root) may not produce to station {other}"
    assert (await consume(gw, st, key))[0] == 403
    assert (await gw.get("/api-keys", token=key))[0] == 403  # a key never manages
    status, body, _ = await gw.get("/api-keys", token=root)
    assert next(k for k in body["keys"] if k["id"] == key_id)["stations"] == [st]
    assert key.split("_", 2)[2] not in str(body)
    async with gw.http.delete(f"{gw.base}/api-keys/{key_id}", headers={"Authorization": f"Bearer {root}"}) as r:
        assert r.status == 200
    assert (await produce(gw, st, key))[0] == 401
    assert (await produce(gw, st, "mgw_nope_nope"))[0] == 401


async def test_sdk_connection_held_to_the_same_rights(gw: Clients) -> None:
    root = await gw.rest_token()
    a, b = f"sa-{uuid.uuid4().hex[:6]}", f"sb-{uuid.uuid4().hex[:6]}"
    await make_user(gw, root, "sdk-alice", [a], [a])
    await make_user(gw, root, "sdk-bob", [b], [b])
    assert (await produce(gw, a, await login(gw, "sdk-alice"), b"for-alice"))[0] == 200
    port = int(gw.gateway.ports.broker_url.rsplit(":", 1)[1])  # type: ignore[union-attr]
    bob = Memphis()
    await bob.connect(host="127.0.0.1", port=port, username="sdk-bob", password=PASSWORD, timeout_ms=3000)
    alice = Memphis()
    await alice.connect(host="127.0.0.1", port=port, username="sdk-alice", password=PASSWORD, timeout_ms=3000)
    try:
        own = await bob.producer(station_name=b, producer_name="p", timeout_retries=0)
        await own.produce(bytearray(b"own"))
        # the control plane refuses bob's producer and consumer on alice's station (it acts with
        # the requester's rights: test_controlplane_rights.py)
        with pytest.raises(Exception, match=f"user sdk-bob may not produce to station {a}"):
            await bob.producer(station_name=a, producer_name="p2", timeout_retries=0)
        with pytest.raises(Exception, match=f"user sdk-bob may not consume from station {a}"):
            await bob.consumer(station_name=a, consumer_name="spy", consumer_group="spy", timeout_retries=0)
        mine = await alice.consumer(station_name=a, consumer_name="me", consumer_group="me", timeout_retries=0)
        msgs = await mine.fetch(batch_size=10)
        assert [bytes(m.get_data()) for m in msgs] == [b"for-alice"]  # bob's write never landed
        for m in msgs:
            await m.ack()
        for task in (mine.t_ping, mine.t_dls, mine.t_consume):
            if task is not None:
                task.cancel()
        # adding a user reloads the broker's configuration: alice's connection stays
        await make_user(gw, root, "sdk-carol", [], [])
        await (await alice.producer(station_name=a, producer_name="p3", timeout_retries=0)).produce(bytearray(b"2"))
    finally:
        await bob.close()
        await alice.close()


async def test_revocation_seen_by_a_second_replica_and_keys_survive_restart(gw: Clients, tmp_path) -> None:
    root = await gw.rest_token()
    st = f"r-{uuid.uuid4().hex[:6]}"
    erin = await make_user(gw, root, "erin4", [st], [st])
    status, body, _ = await gw.post("/api-keys", {"name": "r", "stations": [st], "actions": ["produce"]},
                                    token=root)
    assert status == 200, body
    key, key_id = body["key"], body["id"]
    broker_url = gw.gateway.ports.broker_url  # type: ignore[union-attr]
    async with running_gateway(settings_for(broker_url, tmp_path / "second")) as second:
        # a key made on the first replica works on the second (it survives a restart the same way: it is in KV)
        assert (await produce(second, st, key))[0] == 200
        assert (await produce(second, st, erin))[0] == 200
        async with gw.http.delete(f"{gw.base}/api-keys/{key_id}", headers={"Authorization": f"Bearer {root}"}):
            pass
        took = await until_status(second, st, key, 401)
        assert took < 1.0, took
        async with gw.http.delete(gw.base + "/users/erin4", headers={"Authorization": f"Bearer {root}"}):
            pass
        took = await until_status(second, st, erin, 401)
        assert took < 2.0, took
        print(f"revocation seen by the second replica after {took * 1000:.0f} ms")


async def until_status(gw: Clients, station: str, token: str, want: int) -> float:
    started = time.monotonic()
    while True:
        status = (await produce(gw, station, token))[0]
        if status == want:
            return time.monotonic() - started
        assert time.monotonic() - started < 5, status
        await asyncio.sleep(0.005)


async def test_keys_and_users_survive_a_restart(tmp_path) -> None:
    settings = settings_for("", tmp_path / "restart", control_plane=False, broker_port=0)
    async with running_gateway(settings) as gw:
        root = await gw.rest_token()
        await make_user(gw, root, "frank5", ["kept"], [])
        status, body, _ = await gw.post("/api-keys", {"name": "kept", "stations": ["kept"], "actions": ["produce"]},
                                        token=root)
        assert status == 200, body
        key = body["key"]
    async with running_gateway(settings) as gw:  # a new gateway and nats-server on the same data
        assert (await produce(gw, "kept", key))[0] == 200
        frank = await login(gw, "frank5")  # the broker's configuration was rebuilt from KV
        assert (await produce(gw, "kept", frank))[0] == 200
        assert (await produce(gw, "other", frank))[0] == 403


async def test_a_consume_only_user_decodes_with_the_current_schema_version(gw: Clients) -> None:
    """A user who only consumes has a connection of its own, on which nothing produces: a new version
    of the station's protobuf schema must still be the one its decoding uses (REST and gRPC)."""
    from tests.integration.test_schemas import ORDER_PROTO

    root = await gw.rest_token()
    tag = uuid.uuid4().hex[:6]
    schema, station = f"dsc-{tag}", f"dst-{tag}"
    assert (await gw.post("/schemas", {"name": schema, "type": "protobuf", "definition": ORDER_PROTO},
                          token=root))[0] == 200
    assert (await gw.post("/stations", {"name": station, "schema_name": schema}, token=root))[0] == 200
    reader = await make_user(gw, root, f"reader-{tag}", [], [station])
    ask = {"consumer_name": "r", "consumer_group": "r", "batch_size": 10, "batch_max_wait_time_ms": 200,
           "decode": True}
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", ask, token=reader)
    assert status == 200 and body == [], body  # the group exists: the reader's connection loaded version 1
    v2 = ORDER_PROTO.replace("repeated string tags = 3;", "repeated string tags = 3;\n  string note = 4;")
    status, body, _ = await gw.post("/schemas", {"name": schema, "type": "protobuf", "definition": v2}, token=root)
    assert status == 200 and body["schema"]["active_version"]["version_number"] == 2, body
    await asyncio.sleep(0.5)  # the new version is pushed to every connection using the station
    for n in (1, 2):
        status, body, _ = await gw.post(f"/stations/{station}/produce/single", {"id": n, "note": f"v2-{n}"},
                                        token=root)
        assert status == 200, body  # root's producer converted the JSON with version 2 (note is field 4)
    status, body, _ = await gw.post(f"/stations/{station}/consume/batch", {**ask, "batch_size": 1}, token=reader)
    assert status == 200 and [m.get("decoded") for m in body] == [{"id": "1", "note": "v2-1"}], body
    reply = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
        station=station, consumer_name="r", consumer_group="r", batch_size=1, batch_max_wait_time_ms=1000,
        decode=True), metadata=bearer(await login(gw, f"reader-{tag}")))
    from google.protobuf import json_format
    assert [json_format.MessageToDict(m.decoded) for m in reply.messages] == [{"id": "2", "note": "v2-2"}]
