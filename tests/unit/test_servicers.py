"""The servicers' own logic against an in-memory broker (tests/unit/fakebroker.py): no processes."""

from __future__ import annotations

import base64

import pytest
from google.api import httpbody_pb2
from memgw.v1 import auth_pb2, consume_pb2, monitoring_pb2, produce_pb2

from gateway.auth.tokens import ACCESS, REFRESH, TokenService
from gateway.core.errors import InvalidArgument, Unauthenticated, Unavailable
from gateway.core.identity import Credentials, Principal
from gateway.rpc.call import CallContext
from gateway.servicers.auth import AuthService
from gateway.servicers.consume import ConsumeService
from gateway.servicers.monitoring import MonitoringService
from gateway.servicers.produce import ProduceService
from tests.unit.fakebroker import FakeBroker

PASSWORD = "T3st-secret-9z"  # distinctive: looked for in the token
ROOT = Credentials(username="root", account_id=1, password=PASSWORD)


def ctx(protocol: str = "rest") -> CallContext:
    return CallContext(protocol=protocol, metadata={}, principal=Principal(credentials=ROOT))


def body(data: bytes, content_type: str = "application/json") -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=content_type, data=data)


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


async def test_produce_single_validates_headers_once_and_takes_the_keys(broker: FakeBroker) -> None:
    svc = ProduceService(broker, max_batch=10)
    req = produce_pb2.ProduceSingleRequest(
        station="Orders", body=body(b"{}"),
        headers={"X-Source": "t", "Authorization": "Bearer x", "msg-id": "k1", "Partition-Key": "p"})
    assert (await svc.ProduceSingle(req, ctx())).success
    [m] = broker.stored["orders"]  # station names are lower-cased
    assert dict(m.headers.items) == {"X-Source": "t", "Partition-Key": "p"}  # credentials dropped, alias consumed
    assert (m.headers.idempotency_key, m.headers.partition_key) == ("k1", "p")


@pytest.mark.parametrize("headers", [{"Status": "503"}, {"Nats-Rollup": "all"}, {"$memphis_x": "1"},
                                     {"X-A": "a\r\nX-B: b"}, {"bad name": "v"}, {"X\u00e9": "v"}])
async def test_produce_refuses_headers_the_broker_would_misread(broker: FakeBroker, headers: dict[str, str]) -> None:
    svc = ProduceService(broker, max_batch=10)
    with pytest.raises(InvalidArgument):
        await svc.ProduceSingle(produce_pb2.ProduceSingleRequest(station="s", body=body(b"x"), headers=headers), ctx())
    assert not broker.stored


async def test_produce_refuses_cr_lf_in_an_idempotency_key(broker: FakeBroker) -> None:
    svc = ProduceService(broker, max_batch=10)
    req = produce_pb2.ProduceSingleRequest(station="s", body=body(b"x"), idempotency_key="k\r\nX-Injected: yes")
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        await svc.ProduceSingle(req, ctx())


async def test_produce_single_refuses_other_content_types_with_415(broker: FakeBroker) -> None:
    svc = ProduceService(broker, max_batch=10)
    with pytest.raises(InvalidArgument) as info:
        await svc.ProduceSingle(produce_pb2.ProduceSingleRequest(station="s", body=body(b"x", "image/png")), ctx())
    assert info.value.http_status == 415 and "image/png" in info.value.message


async def test_batch_partial_failure_counts_sent_and_failed(broker: FakeBroker) -> None:
    broker.refuse[b"2"] = "Schema validation has failed: nope"
    svc = ProduceService(broker, max_batch=10)
    with pytest.raises(InvalidArgument) as info:
        await svc.ProduceBatch(produce_pb2.ProduceBatchRequest(station="s", body=body(b"[1, 2, 3]")), ctx())
    detail = info.value.detail
    assert isinstance(detail, produce_pb2.ProduceBatchFailure)
    assert (detail.sent, detail.fail, list(detail.errors)) == (2, 1, ["Schema validation has failed: nope"])


async def test_batch_over_the_limit_is_refused_before_the_broker(broker: FakeBroker) -> None:
    svc = ProduceService(broker, max_batch=2)
    with pytest.raises(InvalidArgument, match="too many messages"):
        await svc.ProduceBatch(produce_pb2.ProduceBatchRequest(station="s", body=body(b"[1, 2, 3]")), ctx())
    assert not broker.stored


async def test_grpc_batch_messages_add_their_own_headers_to_the_shared_ones(broker: FakeBroker) -> None:
    svc = ProduceService(broker, max_batch=10)
    req = produce_pb2.ProduceBatchRequest(station="s", headers={"X-All": "1"}, messages=[
        produce_pb2.ProducedMessage(data=b"a", headers={"X-One": "a"}, idempotency_key="ka"),
        produce_pb2.ProducedMessage(data=b"b")])
    await svc.ProduceBatch(req, ctx("grpc"))
    a, b = broker.stored["s"]
    assert dict(a.headers.items) == {"X-All": "1", "X-One": "a"} and a.headers.idempotency_key == "ka"
    assert dict(b.headers.items) == {"X-All": "1"} and not b.headers.idempotency_key


async def test_consume_maps_groups_as_the_memphis_rest_gateway_did(broker: FakeBroker) -> None:
    svc = ConsumeService(broker, max_batch=100, max_wait_ms=1000)
    await svc.ConsumeBatch(consume_pb2.ConsumeBatchRequest(station="s", consumer_name="c"), ctx())
    await svc.ConsumeBatch(consume_pb2.ConsumeBatchRequest(station="s", consumer_name="c", consumer_group="G"), ctx())
    (first, size, wait), (second, _, _) = broker.fetched
    assert (first.group, second.group, size, wait) == ("rest-gateway", "g-rest-gateway", 10, 1.0)


@pytest.mark.parametrize(("request_fields", "why"), [
    ({}, "Consumer name is required"),
    ({"consumer_name": "c", "batch_size": 101}, "batch_size"),
    ({"consumer_name": "c", "batch_max_wait_time_ms": 1001}, "batch_max_wait_time_ms"),
    ({"consumer_name": "bad name"}, "consumer name"),
])
async def test_consume_refuses_bad_requests(broker: FakeBroker, request_fields: dict[str, object], why: str) -> None:
    svc = ConsumeService(broker, max_batch=100, max_wait_ms=1000)
    with pytest.raises(InvalidArgument, match=why):
        await svc.ConsumeBatch(consume_pb2.ConsumeBatchRequest(station="s", **request_fields), ctx())  # type: ignore[arg-type]
    assert not broker.fetched


async def test_answers_are_capped_by_bytes_grpc_ones_also_by_the_message_limit(broker: FakeBroker) -> None:
    svc = ConsumeService(broker, max_batch=100, max_wait_ms=1000, max_answer_bytes=8192, max_message_bytes=4096)
    await svc.ConsumeBatch(consume_pb2.ConsumeBatchRequest(station="s", consumer_name="c"), ctx("grpc"))
    await svc.ConsumeBatch(consume_pb2.ConsumeBatchRequest(station="s", consumer_name="c"), ctx("rest"))
    assert [spec.max_bytes for spec, _, _ in broker.fetched] == [4096, 8192]


async def test_ack_needs_ids_and_counts_the_valid_ones(broker: FakeBroker) -> None:
    svc = ConsumeService(broker, max_batch=100, max_wait_ms=1000)
    with pytest.raises(InvalidArgument, match="ack_ids"):
        await svc.Ack(consume_pb2.AckRequest(station="s"), ctx())
    reply = await svc.Ack(consume_pb2.AckRequest(station="S", ack_ids=["ack-0", "forged"], nack=True), ctx())
    assert reply.acked == 1 and broker.acked == [("s", ("ack-0", "forged"), True)]


async def test_authenticate_proves_the_credentials_and_seals_them() -> None:
    tokens = TokenService("s" * 40)
    svc = AuthService(FakeBroker(passwords={"root": PASSWORD}), tokens, access_min=15, refresh_min=300)
    reply = await svc.Authenticate(auth_pb2.AuthenticateRequest(username="root$1", password=PASSWORD), ctx())
    principal, creds = tokens.verify(reply.jwt, ACCESS)
    payload = base64.urlsafe_b64decode(reply.jwt.split(".")[1] + "==")
    assert creds == ROOT and principal.identity == "root$1" and PASSWORD.encode() not in payload
    assert tokens.verify(reply.jwt_refresh_token, REFRESH)[1] == ROOT
    with pytest.raises(Unauthenticated):
        await svc.Authenticate(auth_pb2.AuthenticateRequest(username="root", password="wrong"), ctx())


async def test_monitoring_status_tells_the_truth() -> None:
    broker = FakeBroker(down="broker unavailable: refused")
    svc = MonitoringService(broker)
    with pytest.raises(Unavailable) as info:
        await svc.Status(monitoring_pb2.StatusRequest(), ctx())
    assert isinstance(info.value.detail, monitoring_pb2.StatusResponse) and info.value.detail.status == "unavailable"
    broker.down = None
    assert (await svc.Status(monitoring_pb2.StatusRequest(), ctx())).status == "ok"
