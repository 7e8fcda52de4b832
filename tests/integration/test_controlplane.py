"""The control plane against a real nats-server, driven by unmodified memphis-py 1.3.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from memphis import Memphis
from memphis.exceptions import MemphisError, MemphisSchemaError
from memphis.types import Retention, Storage
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import NotFoundError

from gateway.core.errors import InvalidArgument
from gateway.core.names import internal_name, produce_subject, stream_name, validate_name
from gateway.embedded.catalog import Catalog
from gateway.embedded.controlplane import ControlPlane
from gateway.embedded.server import EmbeddedBroker
from gateway.embedded.specs import GroupSpec
from tests.conftest import ROOT_PASSWORD, ROOT_USER, connect_root

Connect = Callable[[], Awaitable[Memphis]]


def close_sdk_tasks(m: Memphis) -> None:
    """memphis-py's close() leaves every Consumer's tasks running (docs/memphis-py.md B7): cancel them."""
    for consumer in list(m.consumers_map.values()):
        for task in (consumer.t_ping, consumer.t_dls, consumer.t_consume):
            if task is not None:
                task.cancel()
    for task in list(m.functions_tasks.values()):
        task.cancel()


@pytest.fixture
async def memphis(nats_server: EmbeddedBroker, control_plane: ControlPlane) -> AsyncIterator[Connect]:
    """Connects memphis-py clients as root; closes them and their leaked tasks afterwards."""
    clients: list[Memphis] = []

    async def connect() -> Memphis:
        m = Memphis()
        await m.connect(
            host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD, account_id=1
        )
        clients.append(m)
        return m

    yield connect
    for m in clients:
        close_sdk_tasks(m)
        await m.close()
    # Consumers replaced in consumers_map, destroyed ones' subscriptions: sweep what is left.
    for task in asyncio.all_tasks():
        if getattr(task.get_coro(), "__qualname__", "").startswith(("Consumer.", "Memphis.")):
            task.cancel()


@pytest.fixture(scope="module")
async def nc(nats_server: EmbeddedBroker) -> AsyncIterator[Client]:
    client = await connect_root(nats_server)
    yield client
    await client.close()


async def test_produce_fetch_ack(memphis: Connect, nc: Client) -> None:
    m = await memphis()
    station = await m.station("orders", timeout_retries=0)
    assert station.name == "orders"
    assert (await m.station("orders", timeout_retries=0)).name == "orders"  # "already exists" is success
    producer = await m.producer("orders", "prod-1", timeout_retries=0)
    for i in range(3):
        await producer.produce(bytearray(f"m{i}".encode()))
    await producer.produce({"n": 3})
    consumer = await m.consumer("orders", "cons-1", consumer_group="grp.one", timeout_retries=0)
    msgs = await consumer.fetch(10)
    assert [bytes(msg.get_data()) for msg in msgs] == [b"m0", b"m1", b"m2", b'{"n": 3}']
    assert msgs[0].get_headers()["$memphis_producedBy"] == "prod-1"
    for msg in msgs:
        await msg.ack()

    js = nc.jetstream()
    stream = await js.stream_info("orders$1")
    assert stream.config.subjects == ["orders$1.>"]
    assert stream.config.max_age == 3600 and stream.config.duplicate_window == 120
    assert stream.config.storage == api.StorageType.FILE
    durable = await js.consumer_info("orders$1", "grp#one")
    assert durable.config.filter_subject == "orders$1.final"
    assert durable.config.ack_policy == api.AckPolicy.EXPLICIT
    assert durable.config.ack_wait == 30 and durable.config.max_deliver == 2
    assert durable.config.max_ack_pending == -1
    assert durable.config.deliver_policy == api.DeliverPolicy.ALL
    await consumer.destroy(timeout_retries=0)
    await producer.destroy(timeout_retries=0)
    for _ in range(50):
        durable = await js.consumer_info("orders$1", "grp#one")
        if durable.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert durable.num_ack_pending == 0 and durable.num_pending == 0


async def test_group_keeps_its_position(memphis: Connect) -> None:
    m = await memphis()
    await m.station("positions", timeout_retries=0)
    for i in range(4):
        await m.produce("positions", "prod", bytearray(str(i).encode()))
    first = await m.consumer("positions", "c-a", consumer_group="team", timeout_retries=0)
    msgs = await first.fetch(2)
    assert [bytes(x.get_data()) for x in msgs] == [b"0", b"1"]
    for msg in msgs:
        await msg.ack()
    await first.destroy(timeout_retries=0)  # the durable stays: the group keeps its place

    second = await m.consumer("positions", "c-b", consumer_group="team", timeout_retries=0)
    assert [bytes(x.get_data()) for x in await second.fetch(10)] == [b"2", b"3"]


async def test_consumer_start_options(memphis: Connect) -> None:
    m = await memphis()
    await m.station("starts", timeout_retries=0)
    for i in range(1, 6):
        await m.produce("starts", "prod", bytearray(str(i).encode()))
    last_two = await m.consumer("starts", "last-two", last_messages=2, timeout_retries=0)
    assert [bytes(x.get_data()) for x in await last_two.fetch(10)] == [b"4", b"5"]
    from_three = await m.consumer("starts", "from-three", start_consume_from_sequence=3, timeout_retries=0)
    assert [bytes(x.get_data()) for x in await from_three.fetch(10)] == [b"3", b"4", b"5"]


async def test_consumer_creates_a_missing_station(memphis: Connect, control_plane: ControlPlane) -> None:
    m = await memphis()
    consumer = await m.consumer("born.by-consumer", "early", timeout_retries=0)
    info = await control_plane.catalog.station_info("born.by-consumer")
    assert info is not None and info.internal_name == "born#by-consumer" and info.partitions == [1]
    await m.produce("born.by-consumer", "late", bytearray(b"hello"))
    assert [bytes(x.get_data()) for x in await consumer.fetch(1)] == [b"hello"]


async def test_station_destruction(memphis: Connect, nc: Client, control_plane: ControlPlane) -> None:
    m = await memphis()
    station = await m.station("doomed", timeout_retries=0)
    await m.produce("doomed", "prod", bytearray(b"x"))
    await station.destroy(timeout_retries=0)
    with pytest.raises(NotFoundError):
        await nc.jetstream().stream_info("doomed$1")
    assert await control_plane.catalog.station_info("doomed") is None
    await station.destroy(timeout_retries=0)  # "does not exist" is tolerated by the SDK
    assert not await control_plane.catalog.destroy_station("doomed")


@pytest.mark.parametrize("name", ["Bad Name", "-leading", "trailing_", "x" * 129, "semi;colon"])
async def test_invalid_station_names_are_refused(memphis: Connect, name: str) -> None:
    m = await memphis()
    with pytest.raises(MemphisError, match=r"(?i)station name"):
        await m.station(name, timeout_retries=0)
    with pytest.raises(MemphisError, match=r"(?i)station name"):
        await m.producer(name, "prod", timeout_retries=0)
    with pytest.raises(MemphisError, match=r"(?i)station name"):  # plain text: it survives bug B4 (docs/memphis-py.md)
        await m.consumer(name, "cons", timeout_retries=0)


async def test_invalid_group_name_is_a_readable_error(memphis: Connect) -> None:
    m = await memphis()
    with pytest.raises(MemphisError, match="consumer group name"):
        await m.consumer("fine", "cons", consumer_group="bad group", timeout_retries=0)


async def test_json_schema_is_enforced(memphis: Connect, tmp_path: Path, control_plane: ControlPlane) -> None:
    schema = tmp_path / "order.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}))
    m = await memphis()
    await m.create_schema("order-schema", "json", str(schema), timeout_retries=0)
    await m.create_schema("order-schema", "json", str(schema), timeout_retries=0)  # "already exists": fine
    await m.station("validated", timeout_retries=0)
    await m.enforce_schema("order-schema", "validated", timeout_retries=0)
    info = await control_plane.catalog.station_info("validated")
    assert info is not None and info.schema is not None and info.schema.type == "json"

    producer = await m.producer("validated", "prod", timeout_retries=0)
    await producer.produce({"id": 1})
    with pytest.raises(MemphisSchemaError, match="Schema validation has failed"):
        await producer.produce({"id": "one"})
    with pytest.raises(MemphisSchemaError, match="Schema validation has failed"):
        await producer.produce(bytearray(b"not json"))


async def test_schema_attach_and_detach_push_updates(memphis: Connect, nc: Client, tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    m = await memphis()
    await m.create_schema("pushed", "json", str(schema), timeout_retries=0)
    await m.station("pushy.station", timeout_retries=0)
    sub = await nc.subscribe("$memphis_schema_updates_pushy#station")
    await m.enforce_schema("pushed", "pushy.station", timeout_retries=0)
    update = json.loads((await sub.next_msg(timeout=2)).data)
    assert update["UpdateType"] == 1 and update["init"]["schema_name"] == "pushed"
    assert update["init"]["active_version"]["schema_content"] == '{"type": "object"}'
    await m.detach_schema("pushy.station", timeout_retries=0)
    update = json.loads((await sub.next_msg(timeout=2)).data)
    assert update["UpdateType"] == 2 and update["init"]["schema_name"] == "" and update["init"]["type"] == ""
    await sub.unsubscribe()


async def test_schema_errors(memphis: Connect, tmp_path: Path) -> None:
    m = await memphis()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MemphisError, match="invalid json schema"):
        await m.create_schema("broken", "json", str(bad), timeout_retries=0)
    await m.station("schemaless", timeout_retries=0)
    with pytest.raises(MemphisError, match="Schema missing does not exist"):
        await m.enforce_schema("missing", "schemaless", timeout_retries=0)


async def test_three_partitions(memphis: Connect, nc: Client) -> None:
    m = await memphis()
    await m.station("parted", partitions_number=3, timeout_retries=0)
    js = nc.jetstream()
    for p in (1, 2, 3):
        assert (await js.stream_info(f"parted${p}")).config.subjects == [f"parted${p}.>"]
    with pytest.raises(NotFoundError):
        await js.stream_info("parted$4")
    producer = await m.producer("parted", "prod", timeout_retries=0)
    for i in range(6):
        await producer.produce(bytearray(str(i).encode()))
    counts = [(await js.stream_info(f"parted${p}")).state.messages for p in (1, 2, 3)]
    assert counts == [2, 2, 2]  # round robin
    consumer = await m.consumer("parted", "all", timeout_retries=0)
    got = []
    for _ in range(3):
        got += [bytes(x.get_data()) for x in await consumer.fetch(10)]
    assert sorted(got) == [str(i).encode() for i in range(6)]


async def test_stream_settings_follow_the_request(memphis: Connect, nc: Client) -> None:
    m = await memphis()
    js = nc.jetstream()
    await m.station("by-count", retention_type=Retention.MESSAGES, retention_value=100,
                    storage_type=Storage.MEMORY, idempotency_window_ms=50, timeout_retries=0)  # fmt: skip
    config = (await js.stream_info("by-count$1")).config
    assert config.max_msgs == 100 and config.max_age == 0 and config.storage == api.StorageType.MEMORY
    assert config.duplicate_window == 0.1  # clamped up to 100 ms
    await m.station("short-lived", retention_value=1, timeout_retries=0)
    config = (await js.stream_info("short-lived$1")).config
    assert config.max_age == 1 and config.duplicate_window == 1  # not beyond the age limit
    await m.station("acked", retention_type=Retention.ACK_BASED, retention_value=0, timeout_retries=0)
    assert (await js.stream_info("acked$1")).config.retention == api.RetentionPolicy.INTEREST
    await m.station("sized", retention_type=Retention.BYTES, retention_value=4096, timeout_retries=0)
    assert (await js.stream_info("sized$1")).config.max_bytes == 4096


async def test_replicas_are_honoured(memphis: Connect, control_plane: ControlPlane) -> None:
    m = await memphis()
    with pytest.raises(MemphisError, match=r"(?i)replicas"):  # a single server cannot keep 3 copies
        await m.station("replicated", replicas=3, timeout_retries=0)
    assert await control_plane.catalog.station_info("replicated") is None  # rolled back


async def test_malformed_requests_get_error_replies(nc: Client, control_plane: ControlPlane) -> None:
    for subject, payload in [
        ("$memphis_station_creations", b"not json"),
        ("$memphis_station_creations", b"[1, 2]"),
        ("$memphis_station_creations", b'{"name": 5}'),
        ("$memphis_station_creations", b'{"name": "ok-name", "retention_value": "long"}'),
        ("$memphis_station_creations", b'{"name": "ok-name", "retention_value": 1e400}'),
        ("$memphis_station_creations", b'{"name": "ok-name", "dls_configuration": 3}'),
        ("$memphis_station_destructions", b"{}"),
        ("$memphis_consumer_creations", b'{"name": "c", "station_name": "s", "start_consume_from_sequence": 0}'),
        ("$memphis_schema_attachments", b"\xff\xfe"),
    ]:
        reply = await nc.request(subject, payload, timeout=2)
        assert reply.data and not reply.data.startswith(b"{"), (subject, payload, reply.data)
    for subject in ("$memphis_producer_creations", "$memphis_schema_creations"):
        reply = await nc.request(subject, b'{"name": "x"}', timeout=2)
        assert json.loads(reply.data)["error"]
    reply = await nc.request("$memphis_producer_destructions", b'{"station_name": "s", "name": "p"}', timeout=2)
    assert reply.data == b""


async def test_one_replica_answers_each_request(nats_server: EmbeddedBroker, nc: Client) -> None:
    second_nc = await connect_root(nats_server)
    second = ControlPlane()
    await second.start(second_nc)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        request = json.dumps({"name": "replicated-once", "station_name": "replicated-once"}).encode()
        for _ in range(4):
            await nc.publish("$memphis_consumer_creations", request, reply=inbox)
        replies = [await sub.next_msg(timeout=2) for _ in range(4)]
        assert all(json.loads(r.data)["partitions_update"]["partitions_list"] == [1] for r in replies)
        with pytest.raises(asyncio.TimeoutError):
            await sub.next_msg(timeout=0.3)
        await sub.unsubscribe()
    finally:
        await second.stop()
        await second_nc.close()


async def test_replicas_see_each_others_changes(nats_server: EmbeddedBroker, control_plane: ControlPlane) -> None:
    other_nc = await connect_root(nats_server)
    other = Catalog()
    await other.open(other_nc)
    try:
        info = await control_plane.catalog.ensure_station("shared")
        assert info.partitions == [1] and info.schema is None
        assert await other.station_info("shared") == info  # cached by both replicas now
        assert await control_plane.catalog.ensure_station("Shared") == info  # names are case-insensitive
        assert await other.destroy_station("shared")
        for _ in range(100):
            if await control_plane.catalog.station_info("shared") is None:
                break
            await asyncio.sleep(0.01)
        assert await control_plane.catalog.station_info("shared") is None
    finally:
        await other.close()
        await other_nc.close()


async def test_python_api(control_plane: ControlPlane) -> None:
    catalog = control_plane.catalog
    with pytest.raises(InvalidArgument, match="station name"):
        await control_plane.catalog.ensure_station("no spaces")
    info = await catalog.ensure_consumer_group("api.station", GroupSpec(name="api-group"))
    assert info.stream(1) == "api#station$1" and info.name == "api.station"
    assert info.schema_update["schema_name"] == ""
    schema = await catalog.create_schema("api-schema", "json", '{"type": "string"}')
    assert schema.version_number == 1
    info = await catalog.attach_schema("api-schema", "api.station")
    assert info.schema == schema
    newer = await catalog.create_schema("api-schema", "json", '{"type": "integer"}')
    assert newer.version_number == 2
    info2 = await control_plane.catalog.station_info("api.station")
    assert info2 is not None and info2.schema == newer
    with pytest.raises(InvalidArgument, match="protobuf"):
        await catalog.create_schema("proto", "protobuf", 'syntax = "proto3";')


async def test_survives_a_broker_restart(memphis: Connect, nats_server: EmbeddedBroker) -> None:
    nats_server.kill()
    await nats_server.start()
    m = None
    for _ in range(50):  # the control plane's connection comes back on its own
        try:
            m = await memphis()
            await m.station("after-restart", timeout_retries=0)
            break
        except MemphisError:
            await asyncio.sleep(0.1)
    assert m is not None
    await m.produce("after-restart", "prod", bytearray(b"ok"))


def test_names() -> None:
    assert internal_name("Grp.One") == "grp#one"
    assert stream_name("Life.Cycle", 1) == "life#cycle$1" and produce_subject("life.cycle", 2) == "life#cycle$2.final"
    assert validate_name("Orders.EU-1") is None
    assert validate_name("") and validate_name(None) and validate_name("a b") and validate_name("_a")
    assert validate_name("a" * 128) is None and validate_name("a" * 129)
