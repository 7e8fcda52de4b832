"""memphis-py, unmodified, and the gateway see the same stations on the embedded broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from memgw.v1 import produce_pb2
from memphis import Headers, Memphis

from tests.conftest import connect_root
from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, bearer


@pytest.fixture
async def sdk(nats_server):
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    consumers = []
    yield m, consumers
    for consumer in consumers:  # memphis-py leaks these tasks (docs/memphis-py.md B7)
        for task in (consumer.t_ping, consumer.t_dls, consumer.t_consume):
            if task is not None:
                task.cancel()
    await m.close()


async def test_memphis_py_consumes_what_the_gateway_produced(gw: Clients, sdk) -> None:
    m, consumers = sdk
    name = f"io-{uuid.uuid4().hex[:8]}"
    token = await gw.rest_token()
    status, _, _ = await gw.post(f"/stations/{name}/produce/single", raw=b"from-rest", token=token,
                                 headers={"Content-Type": "text/plain", "X-Origin": "rest"})
    assert status == 200
    consumer = await m.consumer(station_name=name, consumer_name="sdk", consumer_group="sdk-group",
                                timeout_retries=0)
    consumers.append(consumer)
    msgs = await consumer.fetch(batch_size=10)
    assert [bytes(x.get_data()) for x in msgs] == [b"from-rest"]
    assert msgs[0].get_headers()["X-Origin"] == "rest"
    for x in msgs:
        await x.ack()


async def test_gateway_consumes_what_memphis_py_produced(gw: Clients, sdk) -> None:
    m, _ = sdk
    name = f"io-{uuid.uuid4().hex[:8]}"
    producer = await m.producer(station_name=name, producer_name="sdk-producer", timeout_retries=0)
    headers = Headers()
    headers.add("X-Origin", "sdk")
    await producer.produce(bytearray(b'{"n": 1}'), headers=headers)
    token = await gw.rest_token()
    status, body, _ = await gw.post(f"/stations/{name}/consume/batch",
                                    {"consumer_name": "gw", "batch_max_wait_time_ms": 1000}, token=token)
    assert status == 200
    assert body == [{"message": '{"n": 1}', "headers": {"X-Origin": "sdk"}}]


async def test_partitioned_station_round_trip(gw: Clients, sdk) -> None:
    m, _ = sdk
    name = f"io-{uuid.uuid4().hex[:8]}"
    await m.station(name=name, partitions_number=3, timeout_retries=0)
    token = await gw.rest_token()
    status, _, _ = await gw.post(f"/stations/{name}/produce/batch", list(range(9)), token=token)
    assert status == 200
    got: list[str] = []
    for _ in range(5):
        status, body, _ = await gw.post(f"/stations/{name}/consume/batch",
                                        {"consumer_name": "p", "batch_size": 9, "batch_max_wait_time_ms": 300},
                                        token=token)
        got += [x["message"] for x in body]
        if len(got) == 9:
            break
        await asyncio.sleep(0)
    assert sorted(got, key=int) == [str(i) for i in range(9)]


async def test_a_partition_key_keeps_its_partition_as_memphis_py_picks_it(gw: Clients, sdk, nats_server) -> None:
    """Messages with one key land in one partition, the one memphis-py's own producer picks
    for that key, whether the key comes as a gRPC field, a REST header or a REST query parameter."""
    m, _ = sdk
    name = f"pk-{uuid.uuid4().hex[:8]}"
    await m.station(name=name, partitions_number=3, timeout_retries=0)
    producer = await m.producer(station_name=name, producer_name="pk-sdk", timeout_retries=0)
    keys = [f"key-{i}" for i in range(8)]
    expected = {key: int(producer.get_partition_from_key(key)) for key in keys}
    assert len(set(expected.values())) > 1  # the keys spread: the test can tell partitions apart
    rest_token, grpc_token = await gw.rest_token(), await gw.grpc_token()
    for key in keys:
        for i in range(3):
            data = f"{key}/{i}".encode()
            if i == 0:
                await gw.produce.ProduceSingle(
                    produce_pb2.ProduceSingleRequest(station=name, body={"content_type": "text/plain", "data": data},
                                                     partition_key=key), metadata=bearer(grpc_token))
                continue
            path, headers = f"/stations/{name}/produce/single", {"Content-Type": "text/plain"}
            if i == 1:
                headers["Partition-Key"] = key
            else:
                path += f"?partitionKey={key}"
            status, body, _ = await gw.post(path, raw=data, token=rest_token, headers=headers)
            assert status == 200, body
    nc = await connect_root(nats_server)
    try:
        js = nc.jetstream()
        found: dict[str, set[int]] = {key: set() for key in keys}
        for partition in (1, 2, 3):
            stream = f"{name}${partition}"
            count = (await js.stream_info(stream)).state.messages
            for seq in range(1, count + 1):
                key = (await js.get_msg(stream, seq)).data.decode().partition("/")[0]
                found[key].add(partition)
        assert sum(len(v) for v in found.values()) == len(keys)  # one partition per key
        assert {key: next(iter(parts)) for key, parts in found.items()} == expected
        total = sum([(await js.stream_info(f"{name}${p}")).state.messages for p in (1, 2, 3)])
        assert total == 3 * len(keys)
    finally:
        await nc.close()
