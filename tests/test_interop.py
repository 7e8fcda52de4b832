"""memphis-py, unmodified, and the gateway see the same stations on the embedded broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from memphis import Headers, Memphis

from tests.harness import ROOT_PASSWORD, ROOT_USER, Clients, running_gateway, settings_for


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> Clients:
    async with running_gateway(settings_for(nats_server.url, tmp_path_factory.mktemp("gw"))) as clients:
        yield clients


@pytest.fixture
async def sdk(nats_server):
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    consumers = []
    yield m, consumers
    for consumer in consumers:  # memphis-py leaks these tasks (MEMPHIS.md B7)
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
