"""Every docs/rest-api.md route over REST, and the same operation over gRPC, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status
from memgw.v1 import auth_pb2, consume_pb2, monitoring_pb2, produce_pb2

from tests.harness import (
    ROOT_PASSWORD,
    ROOT_USER,
    Clients,
    bearer,
    is_unauthorized,
    jwt_payload,
)


def station() -> str:
    return f"st-{uuid.uuid4().hex[:10]}"


async def grpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- auth ----------------------------------------------------------------------------------


async def test_authenticate_rest_shape_and_no_secret_in_token(gw: Clients) -> None:
    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
    assert status == 200
    assert set(body) == {"expires_in", "jwt", "jwt_refresh_token", "refresh_token_expires_in"}
    assert body["expires_in"] == 900000 and body["refresh_token_expires_in"] == 18000000
    for tok in (body["jwt"], body["jwt_refresh_token"]):
        payload = jwt_payload(tok)
        assert ROOT_PASSWORD.encode() not in payload
        assert json.loads(payload)["sub"] == ROOT_USER


async def test_authenticate_grpc_and_custom_expiry(gw: Clients) -> None:
    reply = await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(
        username=f"{ROOT_USER}$1", password=ROOT_PASSWORD, token_expiry_in_minutes=1,
        refresh_token_expiry_in_minutes=2))
    assert reply.expires_in == 60000 and reply.refresh_token_expires_in == 120000
    assert ROOT_PASSWORD.encode() not in jwt_payload(reply.jwt)


async def test_authenticate_account_id_in_query(gw: Clients) -> None:
    creds = {"username": ROOT_USER, "password": ROOT_PASSWORD}
    status, body, _ = await gw.post("/auth/authenticate?accountId=1", creds)
    assert status == 200, body


async def test_wrong_password_is_401(gw: Clients) -> None:
    status, body, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": "nope"})
    assert status == 401 and is_unauthorized(body), body
    err = await grpc_error(gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER, password="nope")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"username": "root", "password": "memphis", "account_id": "1"}', b"[1, 2]",
     b'{"username": 5, "password": "memphis"}', b'{"username": "root"}'],
)
async def test_malformed_authenticate_is_400(gw: Clients, raw: bytes) -> None:
    status, body, _ = await gw.post("/auth/authenticate", raw=raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert set(body) == {"message"} and body["message"]


async def test_refresh_token_rest_and_grpc(gw: Clients) -> None:
    _, first, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
    status, body, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": first["jwt_refresh_token"]})
    assert status == 200 and set(body) == {"expires_in", "jwt", "jwt_refresh_token", "refresh_token_expires_in"}
    reply = await gw.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=body["jwt_refresh_token"]))
    assert reply.jwt
    # an access token is not a refresh token, nor is garbage or nothing
    for bad in (first["jwt"], "garbage", ""):
        status, body, _ = await gw.post("/auth/refreshToken", {"jwt_refresh_token": bad})
        assert status == 401 and is_unauthorized(body), body
        err = await grpc_error(gw.auth.RefreshToken(auth_pb2.RefreshTokenRequest(jwt_refresh_token=bad)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_refresh_token_is_not_an_access_token(gw: Clients) -> None:
    _, first, _ = await gw.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
    refresh = first["jwt_refresh_token"]
    status, body, _ = await gw.post(f"/stations/{station()}/produce/single", raw=b"x", token=refresh,
                                    headers={"Content-Type": "text/plain"})
    assert status == 401 and is_unauthorized(body), body
    err = await grpc_error(gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station=station()), metadata=bearer(refresh)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_missing_or_bad_token_is_401(gw: Clients) -> None:
    path = f"/stations/{station()}/produce/single"
    for token in (None, "garbage"):
        status, body, _ = await gw.post(path, raw=b"x", token=token, headers={"Content-Type": "text/plain"})
        assert status == 401 and is_unauthorized(body), body
    err = await grpc_error(gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(station="a")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_token_in_query_parameter(gw: Clients, token: str) -> None:
    status, body, _ = await gw.post(f"/stations/{station()}/produce/single?authorization={token}", raw=b"hi",
                                    headers={"Content-Type": "text/plain"})
    assert (status, body) == (200, {"error": None, "success": True})


# -- produce and consume --------------------------------------------------------------------


async def consume_rest(gw: Clients, token: str, name: str, **extra) -> list[dict]:
    body = {"consumer_name": "c1", "batch_size": 10, "batch_max_wait_time_ms": 500, **extra}
    status, result, _ = await gw.post(f"/stations/{name}/consume/batch", body, token=token)
    assert status == 200, result
    return result


async def test_rest_produce_single_then_grpc_consume_same_bytes_and_headers(gw: Clients, token: str) -> None:
    name = station()
    status, body, _ = await gw.post(
        f"/stations/{name}/produce/single", raw=b'{"message": "x"}', token=token,
        headers={"Content-Type": "application/json", "X-Trace": "t-1", "Cookie": "secret=1"},
    )
    assert (status, body) == (200, {"error": None, "success": True})
    reply = await gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=name, consumer_name="c1", batch_size=10, batch_max_wait_time_ms=500),
        metadata=bearer(token),
    )
    assert [m.message for m in reply.messages] == [b'{"message": "x"}']
    headers = dict(reply.messages[0].headers)
    assert headers["Content-Type"] == "application/json" and headers["X-Trace"] == "t-1"
    assert not any(k.lower() in ("authorization", "cookie", "content-length") or k.startswith("$memphis")
                   for k in headers)


async def test_grpc_produce_then_rest_consume(gw: Clients, token: str) -> None:
    name = station()
    reply = await gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(
            station=name, body={"content_type": "text/plain", "data": "héllo".encode()}, headers={"k": "v"}),
        metadata=bearer(token),
    )
    assert reply.success
    messages = await consume_rest(gw, token, name)
    assert messages == [{"message": "héllo", "headers": {"k": "v"}}]


async def test_produce_batch_rest_and_grpc(gw: Clients, token: str) -> None:
    name = station()
    status, body, _ = await gw.post(f"/stations/{name}/produce/batch", [{"a": 1}, "two", 3, [4]], token=token)
    assert (status, body) == (200, {"error": None, "success": True})
    reply = await gw.produce.ProduceBatch(
        produce_pb2.ProduceBatchRequest(station=name, messages=[{"data": b"five"}, {"data": b"six"}]),
        metadata=bearer(token),
    )
    assert reply.success
    messages = await consume_rest(gw, token, name)
    assert [m["message"] for m in messages] == ['{"a":1}', '"two"', "3", "[4]", "five", "six"]


@pytest.mark.parametrize("raw", [b'{"not": "an array"}', b"nope"])
async def test_produce_batch_not_an_array_is_400(gw: Clients, token: str, raw: bytes) -> None:
    status, body, _ = await gw.post(f"/stations/{station()}/produce/batch", raw=raw, token=token,
                                    headers={"Content-Type": "application/json"})
    assert status == 400 and body["success"] is False and body["error"]


async def test_unsupported_content_type_is_415(gw: Clients, token: str) -> None:
    status, body, _ = await gw.post(f"/stations/{station()}/produce/single", raw=b"\x00", token=token,
                                    headers={"Content-Type": "application/octet-stream"})
    assert status == 415 and body["success"] is False and "content type" in body["error"]
    err = await grpc_error(gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station="a", body={"content_type": "image/png", "data": b"x"}),
        metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", ["-bad", "a" * 129, "bad$name", "white space"])
async def test_invalid_station_name_is_400(gw: Clients, token: str, bad: str) -> None:
    from urllib.parse import quote

    status, body, _ = await gw.post(f"/stations/{quote(bad)}/produce/single", raw=b"x", token=token,
                                    headers={"Content-Type": "text/plain"})
    assert status == 400 and body["success"] is False and "station name" in body["error"]
    err = await grpc_error(gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station=bad, body={"content_type": "text/plain", "data": b"x"}),
        metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "station name" in err.details()


async def test_reserved_header_is_400(gw: Clients, token: str) -> None:
    status, body, _ = await gw.post(f"/stations/{station()}/produce/single", raw=b"x", token=token,
                                    headers={"Content-Type": "text/plain", "$memphis_producedBy": "evil"})
    assert status == 400 and "reserved" in body["error"]
    err = await grpc_error(gw.produce.ProduceSingle(
        produce_pb2.ProduceSingleRequest(station="a", body={"content_type": "text/plain", "data": b"x"},
                                         headers={"$memphis_x": "1"}), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_consume_errors(gw: Clients, token: str) -> None:
    path = f"/stations/{station()}/consume/batch"
    status, body, _ = await gw.post(path, {"batch_size": 1}, token=token)
    assert (status, body) == (400, {"error": "Consumer name is required", "success": False})
    status, body, _ = await gw.post(path, raw=b"{not json", token=token, headers={"Content-Type": "application/json"})
    assert (status, body) == (400, {"error": "Invalid request body", "success": False})
    err = await grpc_error(gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(station="a"),
                                                   metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "Consumer name is required"
    status, body, _ = await gw.post(path, {"consumer_name": "c", "batch_size": 10**6}, token=token)
    assert status == 400 and "batch_size" in body["error"]


async def test_empty_station_answers_empty_list_fast(gw: Clients, token: str) -> None:
    name = station()
    started = time.monotonic()
    assert await consume_rest(gw, token, name, batch_max_wait_time_ms=200) == []
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    reply = await gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=name, consumer_name="c1", batch_max_wait_time_ms=200),
        metadata=bearer(token))
    assert list(reply.messages) == [] and time.monotonic() - started < 1.0


async def test_consume_returns_early_once_batch_is_full(gw: Clients, token: str) -> None:
    name = station()
    await gw.post(f"/stations/{name}/produce/batch", list(range(5)), token=token)
    started = time.monotonic()
    messages = await consume_rest(gw, token, name, batch_size=5, batch_max_wait_time_ms=5000)
    assert [m["message"] for m in messages] == ["0", "1", "2", "3", "4"]
    assert time.monotonic() - started < 2.0


async def test_consumer_group_keeps_position_across_protocols(gw: Clients, token: str) -> None:
    name = station()
    await gw.post(f"/stations/{name}/produce/batch", list(range(6)), token=token)
    first = await consume_rest(gw, token, name, batch_size=3, consumer_group="g")
    reply = await gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=name, consumer_name="other", consumer_group="g", batch_size=10,
                                        batch_max_wait_time_ms=300), metadata=bearer(token))
    assert [m["message"] for m in first] + [m.message.decode() for m in reply.messages] == list("012345")
    # another group starts from the beginning
    again = await consume_rest(gw, token, name, batch_size=10, consumer_group="h", batch_max_wait_time_ms=300)
    assert len(again) == 6


async def test_explicit_ack_mode_redelivers_nacked(gw: Clients, token: str) -> None:
    name = station()
    await gw.post(f"/stations/{name}/produce/batch", ["a", "b"], token=token)
    got = await consume_rest(gw, token, name, ack_mode="ACK_MODE_EXPLICIT", batch_size=2)
    assert [m["message"] for m in got] == ['"a"', '"b"'] and all(m["ack_id"] for m in got)
    status, body, _ = await gw.post(f"/stations/{name}/ack", {"ack_ids": [got[0]["ack_id"]]}, token=token)
    assert (status, body) == (200, {"error": None, "success": True, "acked": 1})
    reply = await gw.consume.Ack(consume_pb2.AckRequest(station=name, ack_ids=[got[1]["ack_id"]], nack=True),
                                 metadata=bearer(token))
    assert reply.acked == 1
    again = await consume_rest(gw, token, name, ack_mode="ACK_MODE_EXPLICIT", batch_size=2)
    assert [m["message"] for m in again] == ['"b"']
    # an ack id of another station is not accepted
    status, body, _ = await gw.post(f"/stations/{station()}/ack", {"ack_ids": [again[0]["ack_id"]]}, token=token)
    assert body["acked"] == 0


async def test_idempotency_key_dedupes(gw: Clients, token: str) -> None:
    name = station()
    for _ in range(3):
        status, _, _ = await gw.post(f"/stations/{name}/produce/single", raw=b"once", token=token,
                                     headers={"Content-Type": "text/plain", "Idempotency-Key": "k-1"})
        assert status == 200
    await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=name, body={"content_type": "text/plain", "data": b"once"}, idempotency_key="k-1"),
        metadata=bearer(token))
    assert len(await consume_rest(gw, token, name, batch_max_wait_time_ms=300)) == 1


async def test_grpc_streaming_produce_and_subscribe(gw: Clients, token: str) -> None:
    name = station()

    async def frames():
        for i in range(3):
            yield produce_pb2.ProduceStreamRequest(
                station=name, messages=[{"data": f"{i}-{j}".encode()} for j in range(50)])

    reply = await gw.produce.ProduceStream(frames(), metadata=bearer(token))
    assert reply.success and reply.sent == 150
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(station=name, consumer_name="s", batch_size=100),
                                metadata=bearer(token))
    seen: list[bytes] = []
    async for batch in call:
        seen.extend(m.message for m in batch.messages)
        if len(seen) >= 150:
            break
    call.cancel()
    assert sorted(seen) == sorted(f"{i}-{j}".encode() for i in range(3) for j in range(50))


async def test_rest_streaming_consume_ndjson(gw: Clients, token: str) -> None:
    name = station()
    await gw.post(f"/stations/{name}/produce/batch", [1, 2, 3], token=token)
    url = f"{gw.base}/stations/{name}/consume/stream"
    async with gw.http.post(url, json={"consumer_name": "n"}, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        line = await asyncio.wait_for(resp.content.readline(), 5)
    assert [m["message"] for m in json.loads(line)["result"]["messages"]] == ["1", "2", "3"]


# -- monitoring, routing ------------------------------------------------------------------------


async def test_monitoring(gw: Clients, token: str) -> None:
    status, body, _ = await gw.get("/monitoring/status")
    assert (status, body) == (200, {"status": "ok"})
    assert (await gw.monitoring.Status(monitoring_pb2.StatusRequest())).status == "ok"
    status, body, _ = await gw.get("/monitoring/getResourcesUtilization", token=token)
    assert status == 200 and set(body) == {"cpu", "memory", "storage"} and body["storage"] >= 0
    status, _, _ = await gw.get("/monitoring/getResourcesUtilization")
    assert status == 401


async def test_unknown_route_404_and_wrong_method_405(gw: Clients) -> None:
    status, body, _ = await gw.get("/no/such/route")
    assert status == 404 and isinstance(body, dict) and body["message"]
    status, body, _ = await gw.get("/auth/authenticate")
    assert status == 405 and isinstance(body, dict)


async def test_cors_allows_all_origins(gw: Clients) -> None:
    async with gw.http.options(gw.base + "/auth/authenticate", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status in (200, 204)
        assert resp.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")


async def test_batch_partial_failure_with_schema(gw: Clients, token: str, nats_server) -> None:
    """A JSON schema on the station rejects some elements: 400 with sent + fail == len."""
    from memphis import Memphis

    name = station()
    await gw.post(f"/stations/{name}/produce/single", raw=b"{}", token=token,
                  headers={"Content-Type": "application/json"})
    m = Memphis()
    await m.connect(host="127.0.0.1", port=nats_server.port, username=ROOT_USER, password=ROOT_PASSWORD,
                    timeout_ms=3000)
    try:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(json.dumps({"type": "object", "required": ["id"], "properties": {"id": {"type": "number"}}}))
            f.flush()
            await m.create_schema(f"sch-{name}", "json", f.name, timeout_retries=0)
        await m.enforce_schema(f"sch-{name}", name, timeout_retries=0)
    finally:
        await m.close()
    await asyncio.sleep(0.3)  # the schema push reaches the gateway's connection
    status, body, _ = await gw.post(f"/stations/{name}/produce/batch", [{"id": 1}, {"x": 1}, {"id": "no"}],
                                    token=token)
    assert status == 400 and body["success"] is False
    assert (body["sent"], body["fail"]) == (1, 2) and len(body["errors"]) == 2
    status, body, _ = await gw.post(f"/stations/{name}/produce/single", raw=b'{"x": 1}', token=token,
                                    headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"].startswith("Schema validation has failed")
    err = await grpc_error(gw.produce.ProduceBatch(
        produce_pb2.ProduceBatchRequest(station=name, messages=[{"data": b'{"id": 2}'}, {"data": b"[]"}]),
        metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status_proto = rpc_status.from_call(err)
    assert status_proto is not None and isinstance(status_proto, status_pb2.Status)
    failure = produce_pb2.ProduceBatchFailure()
    assert status_proto.details[0].Unpack(failure) and (failure.sent, failure.fail) == (1, 1)
