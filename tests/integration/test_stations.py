"""Station management over REST and gRPC, the same catalog memphis-py sees."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from memgw.v1 import stations_pb2, stations_pb2_grpc
from memphis import Memphis

from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer, running_gateway, settings_for


def name() -> str:
    return f"mg-{uuid.uuid4().hex[:8]}"


async def delete(gw: Clients, path: str, token: str) -> tuple[int, Any]:
    async with gw.http.delete(gw.base + path, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


def stub(gw: Clients) -> stations_pb2_grpc.StationServiceStub:
    return stations_pb2_grpc.StationServiceStub(gw.channel)


DEFAULTS = {"partitions_number": 1, "retention_type": "message_age_sec", "retention_value": 3600,
            "storage_type": "file", "replicas": 1, "idempotency_window_ms": 120000, "schema_name": "",
            "dls": {"poison": True, "schemaverse": True}}


async def test_create_get_list_delete_rest(gw: Clients, token: str) -> None:
    st = name()
    status, body, _ = await gw.post("/stations", {"name": st}, token=token)
    assert status == 200, body
    assert body == {"error": None, "success": True, "created": True, "station": {"name": st, **DEFAULTS}}
    # the same settings again: idempotent
    status, body, _ = await gw.post("/stations", {"name": st, "retention_value": 3600}, token=token)
    assert status == 200 and body["created"] is False
    # other settings: 409
    status, body, _ = await gw.post("/stations", {"name": st, "partitions_number": 2}, token=token)
    assert status == 409 and body["success"] is False and "partitions_number" in body["error"]

    status, body, _ = await gw.post(f"/stations/{st}/produce/batch", [1, 2, 3], token=token)
    assert status == 200
    status, body, _ = await gw.get(f"/stations/{st}", token=token)
    assert status == 200
    assert body["station"]["name"] == st and body["total_messages"] == 3
    assert body["partitions"] == [{"partition": 1, "messages": 3, "first_sequence": 1, "last_sequence": 3}]

    status, body, _ = await gw.get("/stations", token=token)
    assert status == 200 and st in [s["name"] for s in body["stations"]]

    assert await delete(gw, f"/stations/{st}", token) == (200, {"error": None, "success": True})
    status, body, _ = await gw.get(f"/stations/{st}", token=token)
    assert status == 404 and body == {"error": f"Station {st} does not exist", "success": False}
    status, body = await delete(gw, f"/stations/{st}", token)
    assert status == 404


async def test_create_with_settings_and_bad_input_rest(gw: Clients, token: str) -> None:
    st = name()
    spec = {"name": st, "partitions_number": 3, "retention_type": "messages", "retention_value": 100,
            "storage_type": "memory", "replicas": 1, "idempotency_window_ms": 5000,
            "dls": {"poison": False, "schemaverse": True}}
    status, body, _ = await gw.post("/stations", spec, token=token)
    assert status == 200, body
    assert body["station"] == {**spec, "schema_name": ""}
    status, body, _ = await gw.get(f"/stations/{st}", token=token)
    assert [p["partition"] for p in body["partitions"]] == [1, 2, 3]
    for bad, word in (({"name": name(), "retention_type": "forever"}, "retention type"),
                      ({"name": name(), "storage_type": "tape"}, "storage type"),
                      ({"name": name(), "partitions_number": 0}, "partitions number"),
                      ({"name": "Bad Name!"}, "name"),
                      ({}, "name is required"),
                      ({"name": name(), "schema_name": "nope"}, "Schema nope does not exist")):
        status, body, _ = await gw.post("/stations", bad, token=token)
        assert status in (400, 404), (bad, status, body)
        assert word in body["error"], (bad, body)
    status, body, _ = await gw.get("/stations", token=None)
    assert status == 401


async def test_stations_grpc(gw: Clients) -> None:
    md = bearer(await gw.grpc_token())
    st = name()
    reply = await stub(gw).CreateStation(stations_pb2.CreateStationRequest(name=st, partitions_number=2), metadata=md)
    assert reply.created and reply.station.partitions_number == 2 and reply.station.dls.poison
    again = await stub(gw).CreateStation(stations_pb2.CreateStationRequest(name=st, partitions_number=2), metadata=md)
    assert not again.created
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(gw).CreateStation(stations_pb2.CreateStationRequest(name=st, replicas=1, storage_type="memory"),
                                     metadata=md)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    got = await stub(gw).GetStation(stations_pb2.GetStationRequest(name=st), metadata=md)
    assert got.total_messages == 0 and [p.partition for p in got.partitions] == [1, 2]
    listed = await stub(gw).ListStations(stations_pb2.ListStationsRequest(), metadata=md)
    assert st in [s.name for s in listed.stations]
    await stub(gw).DeleteStation(stations_pb2.DeleteStationRequest(name=st), metadata=md)
    for call in (stub(gw).GetStation(stations_pb2.GetStationRequest(name=st), metadata=md),
                 stub(gw).DeleteStation(stations_pb2.DeleteStationRequest(name=st), metadata=md)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_memphis_py_sees_api_stations(gw: Clients, nats_server, token: str) -> None:
    st = name()
    status, body, _ = await gw.post("/stations", {"name": st, "partitions_number": 2}, token=token)
    assert status == 200, body
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    try:
        producer = await m.producer(station_name=st, producer_name="sdk-p", timeout_retries=0)
        assert producer.partition_generator is not None  # the SDK saw 2 partitions
        assert len(m.partition_producers_updates_data[producer.internal_station_name]["partitions_list"]) == 2
        for i in range(4):
            await producer.produce(bytearray(f'{{"n": {i}}}'.encode()))
    finally:
        await m.close()
    status, body, _ = await gw.get(f"/stations/{st}", token=token)
    assert body["total_messages"] == 4 and sorted(p["messages"] for p in body["partitions"]) == [2, 2]
    # a station an SDK made is listed too, and deleting it is seen by the SDK's catalog
    assert (await delete(gw, f"/stations/{st}", token))[0] == 200


async def test_external_memphis_broker_refuses(nats_server, tmp_path_factory) -> None:
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("ext"), control_plane=False)
    async with running_gateway(settings) as gw:
        token = await gw.rest_token()
        status, body, _ = await gw.get("/stations", token=token)
        assert status == 400 and "control plane" in body["error"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(gw).ListStations(stations_pb2.ListStationsRequest(), metadata=bearer(await gw.grpc_token()))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
