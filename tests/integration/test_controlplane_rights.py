"""The control plane acts with the requester's rights (gateway/embedded/controlplane.py, "Who asks").

A gateway with its embedded broker, two application users with disjoint stations and a
management user, each with its own memphis-py connection: what the SDK asks of the control
plane (``$memphis_*`` requests) is answered with the rights of the user nats-server names as the
sender, whatever the request claims.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from memphis import Memphis
from memphis.station import Station

from gateway.core.names import internal_name
from gateway.embedded.catalog import Catalog
from tests.conftest import ROOT_PASSWORD, ROOT_USER
from tests.harness import Clients, running_gateway, settings_for

PASSWORD = "pw-" + "r" * 12


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clients]:
    settings = settings_for("", tmp_path_factory.mktemp("cprights"), control_plane=False, broker_port=0)
    async with running_gateway(settings) as clients:
        yield clients


def broker_port(gw: Clients) -> int:
    return int(gw.gateway.ports.broker_url.rsplit(":", 1)[1])  # type: ignore[union-attr]


def catalog(gw: Clients) -> Catalog:
    assert gw.gateway.control_plane is not None
    return gw.gateway.control_plane.catalog


async def make_user(gw: Clients, username: str, stations: list[str], type_: str = "application") -> None:
    root = await gw.rest_token()
    status, body, _ = await gw.post("/users", {"username": username, "password": PASSWORD, "type": type_,
                                               "permissions": {"produce": stations, "consume": stations}},
                                    token=root)
    assert status == 200, body


async def sdk(gw: Clients, username: str, password: str = PASSWORD) -> Memphis:
    m = Memphis()
    await m.connect(host="127.0.0.1", port=broker_port(gw), username=username, password=password, timeout_ms=3000)
    return m


async def close(m: Memphis) -> None:
    for consumer in list(m.consumers_map.values()):
        for task in (consumer.t_ping, consumer.t_dls, consumer.t_consume):
            if task is not None:
                task.cancel()
    await m.close()


async def durables(gw: Clients, station: str) -> list[str]:
    nc = await nats.connect(gw.gateway.ports.broker_url, user=f"{ROOT_USER}$1",  # type: ignore[union-attr]
                            password=ROOT_PASSWORD)
    try:
        infos = await nc.jetstream().consumers_info(f"{internal_name(station)}$1")
        return sorted(i.name for i in infos)
    finally:
        await nc.close()


async def test_users_act_with_their_own_rights(gw: Clients, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    a, b = f"ra-{tag}", f"rb-{tag}"
    alice_name, bob_name, mgr_name = f"alice-{tag}", f"bob-{tag}", f"mgr-{tag}"
    await make_user(gw, alice_name, [a])
    await make_user(gw, bob_name, [b])
    await make_user(gw, mgr_name, [], type_="management")
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    root, alice, bob, mgr = (await sdk(gw, ROOT_USER, ROOT_PASSWORD), await sdk(gw, alice_name),
                             await sdk(gw, bob_name), await sdk(gw, mgr_name))
    try:
        # alice uses her own station: creates it, produces, consumes through a group
        await alice.station(name=a, timeout_retries=0)
        producer = await alice.producer(station_name=a, producer_name="p", timeout_retries=0)
        await producer.produce(bytearray(b"hello"))
        consumer = await alice.consumer(station_name=a, consumer_name="c", consumer_group="alices",
                                        timeout_retries=0)
        assert [bytes(m.get_data()) for m in await consumer.fetch(batch_size=5)] == [b"hello"]
        before = await durables(gw, a)
        info = await catalog(gw).station_info(a)
        assert info is not None and info.spec.created_by == alice_name

        # bob: no producer, no consumer group (durable), no destruction, no schema on alice's station
        with pytest.raises(Exception, match=f"user {bob_name} may not produce to station {a}"):
            await bob.producer(station_name=a, producer_name="spy", timeout_retries=0)
        with pytest.raises(Exception, match=f"user {bob_name} may not consume from station {a}"):
            await bob.consumer(station_name=a, consumer_name="spy", consumer_group="spies", timeout_retries=0)
        with pytest.raises(Exception, match=f"user {bob_name} may not produce to station {a}"):
            await bob.station(name=a, timeout_retries=0)
        with pytest.raises(Exception, match=f"user {bob_name} may not manage stations"):
            await Station(bob, a).destroy(timeout_retries=0)
        with pytest.raises(Exception, match=f"user {bob_name} may not manage stations or schemas"):
            await bob.create_schema(f"bobs-{tag}", "json", str(schema), timeout_retries=0)
        await root.create_schema(f"s-{tag}", "json", str(schema), timeout_retries=0)
        with pytest.raises(Exception, match=f"user {bob_name} may not manage"):
            await bob.enforce_schema(f"s-{tag}", a, timeout_retries=0)
        with pytest.raises(Exception, match=f"user {bob_name} may not manage"):
            await bob.detach_schema(a, timeout_retries=0)
        info = await catalog(gw).station_info(a)
        assert info is not None and info.spec.schema_name == ""  # untouched
        assert await durables(gw, a) == before and not [d for d in before if "spies" in d]
        # an application user does not destroy even its own station, nor attach schemas to it
        with pytest.raises(Exception, match=f"user {alice_name} may not manage"):
            await Station(alice, a).destroy(timeout_retries=0)
        with pytest.raises(Exception, match=f"user {alice_name} may not manage"):
            await alice.enforce_schema(f"s-{tag}", a, timeout_retries=0)
        # bob's own station works for him
        await (await bob.producer(station_name=b, producer_name="p", timeout_retries=0)).produce(bytearray(b"b"))

        # a management user and root do everything
        await mgr.enforce_schema(f"s-{tag}", a, timeout_retries=0)
        info = await catalog(gw).station_info(a)
        assert info is not None and info.spec.schema_name == f"s-{tag}"
        await root.detach_schema(a, timeout_retries=0)
        await root.consumer(station_name=a, consumer_name="r", consumer_group="roots", timeout_retries=0)
        await root.producer(station_name=b, producer_name="r", timeout_retries=0)
        await Station(mgr, b).destroy(timeout_retries=0)
        await Station(root, a).destroy(timeout_retries=0)
        assert await catalog(gw).station_info(a) is None and await catalog(gw).station_info(b) is None
    finally:
        for m in (root, alice, bob, mgr):
            await close(m)


async def test_a_forged_identity_is_not_believed(gw: Clients) -> None:
    """The payload's username and a client's own Nats-Request-Info header are both ignored: nats-server
    replaces the header with the real sender on the way through the service import."""
    tag = uuid.uuid4().hex[:6]
    a, eve_name = f"fa-{tag}", f"eve-{tag}"
    await catalog(gw).ensure_station(a, ROOT_USER)
    await make_user(gw, eve_name, [f"fe-{tag}"])
    nc = await nats.connect(gw.gateway.ports.broker_url, user=f"{eve_name}$1", password=PASSWORD)  # type: ignore[union-attr]
    try:
        forged = json.dumps({"acc": "MEMPHIS", "user": f"{ROOT_USER}$1"})
        for subject, payload in (
            ("$memphis_consumer_creations", {"name": "x", "station_name": a, "consumers_group": "eves",
                                             "username": ROOT_USER, "req_version": 4}),
            ("$memphis_station_destructions", {"station_name": a, "username": ROOT_USER}),
        ):
            reply = await nc.request(subject, json.dumps(payload).encode(), timeout=3,
                                     headers={"Nats-Request-Info": forged})
            assert f"user {eve_name} may not" in reply.data.decode(), reply.data
    finally:
        await nc.close()
    assert await catalog(gw).station_info(a) is not None
    assert not [d for d in await durables(gw, a) if "eves" in d]


async def test_a_request_without_the_brokers_word_is_refused(gw: Clients) -> None:
    """In verified mode, only requests that crossed the service import are answered: the control
    plane's own account gives no identity, so a request sent there (no header) is refused."""
    from gateway.broker_setup import control_password
    from gateway.embedded.controlplane import CONTROL_USER

    nc = await nats.connect(gw.gateway.ports.broker_url, user=CONTROL_USER,  # type: ignore[union-attr]
                            password=control_password(gw.gateway.settings))
    try:
        reply = await nc.request("$memphis_station_destructions", b'{"station_name": "x", "username": "root"}',
                                 timeout=3)
        assert b"the requester is unknown" in reply.data, reply.data
    finally:
        await nc.close()


async def test_external_broker_without_the_control_account(tmp_path: Path) -> None:
    """--control-plane against a broker the gateway did not configure (no control account): the
    requester is the payload's claim. A user of the broker who is not root still cannot destroy
    stations or attach schemas (the attack of issue 10); the claim itself is forgeable (documented)."""
    from gateway.embedded.server import EmbeddedBroker

    broker = EmbeddedBroker(data_dir=tmp_path / "nats", port=0, root_password=ROOT_PASSWORD,
                            users={"dave": PASSWORD})  # a user of the broker's own, unknown to the gateway
    await broker.start()
    try:
        async with running_gateway(settings_for(broker.url, tmp_path / "gw")) as gw:
            plane = gw.gateway.control_plane
            assert plane is not None and plane.rights is not None and not plane.verified
            schema = tmp_path / "s.json"
            schema.write_text('{"type": "object"}')
            root = Memphis()
            await root.connect(host="127.0.0.1", port=broker.port, username=ROOT_USER, password=ROOT_PASSWORD,
                               timeout_ms=3000)
            dave = Memphis()
            await dave.connect(host="127.0.0.1", port=broker.port, username="dave", password=PASSWORD,
                               timeout_ms=3000)
            try:
                await root.station(name="roots", timeout_retries=0)
                await root.create_schema("s", "json", str(schema), timeout_retries=0)
                await (await dave.producer(station_name="roots", producer_name="d", timeout_retries=0)).produce(
                    bytearray(b"x"))  # the broker lets dave produce; so does the gateway
                with pytest.raises(Exception, match="user dave may not manage"):
                    await dave.enforce_schema("s", "roots", timeout_retries=0)
                with pytest.raises(Exception, match="user dave may not manage"):
                    await Station(dave, "roots").destroy(timeout_retries=0)
                info = await plane.catalog.station_info("roots")
                assert info is not None and info.spec.schema_name == ""
                await root.enforce_schema("s", "roots", timeout_retries=0)
            finally:
                await close(dave)
                await close(root)
    finally:
        await broker.stop()


async def test_a_schema_refusal_report_is_stored_only_for_its_senders_stations(gw: Clients) -> None:
    """Any SDK connection may publish on $memphis_schemaverse_dls (memphis-py reports its refusals
    there); a report naming a station its sender may not produce to is not stored, over REST or gRPC."""
    from memgw.v1 import deadletters_pb2, deadletters_pb2_grpc

    from gateway.embedded.deadletters import SCHEMAVERSE_DLS
    from tests.harness import bearer

    tag = uuid.uuid4().hex[:6]
    own, other, mallory = f"own-{tag}", f"other-{tag}", f"mallory-{tag}"
    root = await gw.rest_token()
    for station in (own, other):
        status, body, _ = await gw.post("/stations", {"name": station}, token=root)
        assert status == 200, body
    await make_user(gw, mallory, [own])
    nc = await nats.connect(gw.gateway.ports.broker_url, user=f"{mallory}$1", password=PASSWORD)  # type: ignore[union-attr]
    try:
        for station, text in ((other, "forged"), (own, "honest")):
            await nc.publish(SCHEMAVERSE_DLS, json.dumps({
                "station_name": station, "producer": {"name": "p", "connection_id": "c"},
                "message": {"data": text.encode().hex(), "headers": {}}, "validation_error": text}).encode())
        await nc.flush()
    finally:
        await nc.close()
    md = bearer(await gw.grpc_token())
    stub = deadletters_pb2_grpc.DeadLetterServiceStub(gw.channel)
    for _ in range(50):  # the honest report is stored asynchronously; the forged one was sent first
        listed = await stub.ListDeadLetters(deadletters_pb2.ListDeadLettersRequest(station=own), metadata=md)
        if listed.dead_letters:
            break
        await asyncio.sleep(0.1)
    assert [d.data for d in listed.dead_letters] == [b"honest"]
    status, body, _ = await gw.get(f"/stations/{other}/dls", token=root)
    assert status == 200 and body["dead_letters"] == [], body
    forged = await stub.ListDeadLetters(deadletters_pb2.ListDeadLettersRequest(station=other), metadata=md)
    assert not forged.dead_letters
