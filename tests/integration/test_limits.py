"""Limits and header hygiene, over REST and gRPC, against a real nats-server.

- body size (413 in the route's JSON shape; gRPC RESOURCE_EXHAUSTED from max_receive_message_length);
- batch length, consume batch_size and batch_max_wait_time_ms (400 / INVALID_ARGUMENT);
- concurrent streams per principal (429 / RESOURCE_EXHAUSTED), freed when a client goes away;
- per-principal rate limits, requests/s and bytes/s (429 + Retry-After / RESOURCE_EXHAUSTED + retry-after);
- header hygiene: credentials and hop-by-hop headers never become message headers, ``$memphis*``
  keys are 400, CR/LF in values INVALID_ARGUMENT, and no raw-socket header trick yields a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from memgw.v1 import consume_pb2, produce_pb2

from tests.harness import Clients, bearer, running_gateway, settings_for

BODY_LIMIT = 64 * 1024
MAX_BATCH = 10
MAX_CONSUME = 50
MAX_WAIT_MS = 2000
MAX_STREAMS = 2
RPS = 5.0
BYTES_PER_S = 8000.0
TEXT = {"Content-Type": "text/plain"}


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    settings = settings_for(
        nats_server.url, tmp_path_factory.mktemp("gw"), max_body_bytes=BODY_LIMIT, max_batch_messages=MAX_BATCH,
        max_consume_batch=MAX_CONSUME, max_consume_wait_ms=MAX_WAIT_MS, max_streams_per_user=MAX_STREAMS,
    )  # fmt: skip
    async with running_gateway(settings) as clients:
        yield clients


@pytest.fixture(scope="module")
async def token(gw: Clients) -> str:
    return await gw.rest_token()


def station() -> str:
    return f"lim-{uuid.uuid4().hex[:10]}"


async def grpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def text_body(data: bytes) -> dict[str, Any]:
    return {"content_type": "text/plain", "data": data}


# -- body size ------------------------------------------------------------------------------------


async def test_oversize_body_is_413_in_the_route_shape(gw: Clients, token: str) -> None:
    big = b"x" * (BODY_LIMIT + 1)
    status, body, headers = await gw.post(f"/stations/{station()}/produce/single", raw=big, token=token, headers=TEXT)
    assert status == 413 and body["success"] is False and "too large" in body["error"]
    assert headers["Content-Type"].startswith("application/json")
    status, body, _ = await gw.post("/auth/authenticate", raw=b'{"username": "' + big + b'"}',
                                    headers={"Content-Type": "application/json"})
    assert status == 413 and set(body) == {"message"} and "too large" in body["message"]
    # chunked, no Content-Length: refused once the limit is passed
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"y" * 4096

    async with gw.http.post(f"{gw.base}/stations/{station()}/produce/batch", data=chunks(),
                            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as resp:
        assert resp.status == 413 and (await resp.json())["success"] is False
    # exactly the limit is fine
    status, body, _ = await gw.post(f"/stations/{station()}/produce/single", raw=b"z" * BODY_LIMIT, token=token,
                                    headers=TEXT)
    assert status == 200, body


async def test_oversize_grpc_message_is_resource_exhausted(gw: Clients, token: str) -> None:
    err = await grpc_error(gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=station(), body=text_body(b"x" * (BODY_LIMIT + 1))), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=station(), body=text_body(b"x" * (BODY_LIMIT - 100))), metadata=bearer(token))
    assert reply.success


async def test_oversize_stream_frame(gw: Clients, token: str) -> None:
    """REST NDJSON client stream: a line over the limit is 413; gRPC: a frame over it RESOURCE_EXHAUSTED."""
    line = json.dumps({"station": station(), "messages": [{"data": "eA==" * (BODY_LIMIT // 4)}]}).encode()
    status, body, _ = await gw.post("/produce/stream", raw=line + b"\n", token=token,
                                    headers={"Content-Type": "application/x-ndjson"})
    assert status == 413 and body["success"] is False

    async def frames() -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
        yield produce_pb2.ProduceStreamRequest(station=station(), messages=[
            produce_pb2.ProducedMessage(data=b"x" * (BODY_LIMIT + 1))])

    err = await grpc_error(gw.produce.ProduceStream(frames(), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- batch and consume limits -----------------------------------------------------------------------


async def test_batch_length_limit(gw: Clients, token: str) -> None:
    name = station()
    status, body, _ = await gw.post(f"/stations/{name}/produce/batch", list(range(MAX_BATCH + 1)), token=token)
    assert status == 400 and body["success"] is False and f"> {MAX_BATCH}" in body["error"]
    status, body, _ = await gw.post(f"/stations/{name}/produce/batch", list(range(MAX_BATCH)), token=token)
    assert status == 200, body
    too_many = [produce_pb2.ProducedMessage(data=b"m") for _ in range(MAX_BATCH + 1)]
    err = await grpc_error(gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(station=name, messages=too_many),
                                                   metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def frames() -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
        yield produce_pb2.ProduceStreamRequest(station=name, messages=too_many)

    err = await grpc_error(gw.produce.ProduceStream(frames(), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("extra", "needle"),
    [({"batch_size": MAX_CONSUME + 1}, "batch_size"), ({"batch_size": 0}, "batch_size"),
     ({"batch_max_wait_time_ms": MAX_WAIT_MS + 1}, "batch_max_wait_time_ms")],
)  # fmt: skip
async def test_consume_limits(gw: Clients, token: str, extra: dict[str, int], needle: str) -> None:
    path = f"/stations/{station()}/consume/batch"
    status, body, _ = await gw.post(path, {"consumer_name": "c", **extra}, token=token)
    assert status == 400 and body["success"] is False and needle in body["error"]
    err = await grpc_error(gw.consume.ConsumeBatch(
        consume_pb2.ConsumeBatchRequest(station=station(), consumer_name="c", **extra), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details()


async def test_consume_default_wait_is_capped_by_the_limit(gw: Clients, token: str) -> None:
    """A request without batch_max_wait_time_ms gets the default (5 s) capped by the limit, not a 400."""
    started = time.monotonic()
    status, body, _ = await gw.post(f"/stations/{station()}/consume/batch", {"consumer_name": "c"}, token=token)
    assert (status, body) == (200, [])
    assert time.monotonic() - started < MAX_WAIT_MS / 1000 + 1.5


async def test_subscribe_batch_size_limit(gw: Clients, token: str) -> None:
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(
        station=station(), consumer_name="c", batch_size=MAX_CONSUME + 1), metadata=bearer(token))
    err = await grpc_error(call.read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, body, _ = await gw.post(f"/stations/{station()}/consume/stream",
                                    {"consumer_name": "c", "batch_size": MAX_CONSUME + 1}, token=token)
    assert status == 400 and "batch_size" in body["error"]


# -- concurrent streams per principal -------------------------------------------------------------


async def open_grpc_stream(gw: Clients, token: str, name: str, group: str) -> Any:
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(  # batch_size 1: the first fetch returns at once
        station=name, consumer_name="s", consumer_group=group, batch_size=1), metadata=bearer(token))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.messages
    return call


async def test_concurrent_streams_per_principal(gw: Clients, token: str) -> None:
    name = station()
    assert (await gw.post(f"/stations/{name}/produce/single", raw=b"m", token=token, headers=TEXT))[0] == 200
    calls = [await open_grpc_stream(gw, token, name, f"g{i}") for i in range(MAX_STREAMS)]
    # a third stream of the same principal (even with another token of it) is refused, both protocols
    other_token = await gw.grpc_token()
    call = gw.consume.Subscribe(consume_pb2.SubscribeRequest(station=name, consumer_name="s", consumer_group="gx"),
                                metadata=bearer(other_token))
    err = await grpc_error(call.read())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_STREAMS) in err.details()
    status, body, _ = await gw.post(f"/stations/{name}/consume/stream", {"consumer_name": "s", "consumer_group": "gy"},
                                    token=token)
    assert status == 429 and body["success"] is False
    err = await grpc_error(gw.produce.ProduceStream(_no_frames(), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # unary calls are not streams: still served
    assert (await gw.post(f"/stations/{name}/produce/single", raw=b"m", token=token, headers=TEXT))[0] == 200
    for c in calls:
        c.cancel()
    await asyncio.sleep(0.3)
    again = await open_grpc_stream(gw, token, name, "g-again")
    again.cancel()
    print(f"\nFIGURES streams: limit {MAX_STREAMS} per principal; stream number {MAX_STREAMS + 1} refused over gRPC "
          "(RESOURCE_EXHAUSTED) and REST (429); a slot is free again once a stream ends")


async def _no_frames() -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
    await asyncio.sleep(10)
    yield produce_pb2.ProduceStreamRequest()


async def test_rest_streams_of_clients_gone_are_released(gw: Clients, token: str) -> None:
    """A REST stream whose client disconnects gives its slot back, even with no message to write."""
    name = station()
    await gw.post(f"/stations/{name}/produce/single", raw=b"m", token=token, headers=TEXT)
    url = f"{gw.base}/stations/{name}/consume/stream"
    for round_ in range(2):  # twice the limit in total: fails at once if slots leak
        for i in range(MAX_STREAMS):
            body = {"consumer_name": "s", "consumer_group": f"r{round_}-{i}", "batch_size": 1}
            resp = await gw.http.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200, await resp.text()
            assert json.loads(await asyncio.wait_for(resp.content.readline(), 5))["result"]["messages"]
            resp.close()  # the client goes away; the station has nothing more to send
        deadline = time.monotonic() + 5
        while True:  # wait until the gateway noticed: a stream is admitted again
            probe = gw.consume.Subscribe(consume_pb2.SubscribeRequest(
                station=name, consumer_name="s", consumer_group=f"probe{round_}", batch_size=1), metadata=bearer(token))
            try:
                await asyncio.wait_for(probe.read(), 3)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "REST stream slots were never released"
                await asyncio.sleep(0.2)
            finally:
                probe.cancel()
        await asyncio.sleep(0.3)


# -- rate limits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def limited(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("gw-rl"), rate_limit_rps=RPS,
                            rate_limit_bytes_per_s=BYTES_PER_S)
    async with running_gateway(settings) as clients:
        yield clients


async def test_rate_limit_is_off_by_default(gw: Clients, token: str) -> None:
    name = station()
    statuses = await asyncio.gather(*(gw.post(f"/stations/{name}/produce/single", raw=b"m", token=token,
                                              headers=TEXT) for _ in range(40)))
    assert {s for s, _, _ in statuses} == {200}


async def test_requests_per_second(limited: Clients) -> None:
    token = await limited.rest_token()  # public methods are not limited
    name = station()
    results = [await limited.post(f"/stations/{name}/produce/single", raw=b"m", token=token, headers=TEXT)
               for _ in range(int(RPS) * 3)]
    refused = [(body, headers) for status, body, headers in results if status == 429]
    served = sum(1 for status, _, _ in results if status == 200)
    assert served >= RPS and refused and served + len(refused) == len(results)
    body, headers = refused[0]
    assert body["success"] is False and "rate limit" in body["error"]
    assert int(headers["Retry-After"]) >= 1
    # gRPC shares the bucket of the principal
    err = await grpc_error(limited.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=name, body=text_body(b"m")), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(err.initial_metadata())["retry-after"]) >= 1
    # and the bucket refills
    await asyncio.sleep(1.0 / RPS * 2)
    assert (await limited.post(f"/stations/{name}/produce/single", raw=b"m", token=token, headers=TEXT))[0] == 200
    print(f"\nFIGURES rate limit {RPS:g} req/s: {len(results)} requests back to back, {served} served, "
          f"{len(refused)} refused with 429 (Retry-After {headers['Retry-After']})")
    await asyncio.sleep(2)


async def test_bytes_per_second(limited: Clients) -> None:
    token = await limited.grpc_token()
    name = station()
    await asyncio.sleep(1.5)  # the request bucket refills
    chunk = b"b" * int(BYTES_PER_S * 0.6)
    first = await limited.post(f"/stations/{name}/produce/single", raw=chunk, token=token, headers=TEXT)
    second = await limited.post(f"/stations/{name}/produce/single", raw=chunk, token=token, headers=TEXT)
    assert first[0] == 200 and second[0] == 429, (first[:2], second[:2])
    assert int(second[2]["Retry-After"]) >= 1
    err = await grpc_error(limited.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=name, body=text_body(chunk)), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # small requests still pass while the bytes bucket refills
    await asyncio.sleep(0.3)
    assert (await limited.post(f"/stations/{name}/produce/single", raw=b"s", token=token, headers=TEXT))[0] == 200
    print(f"\nFIGURES rate limit {BYTES_PER_S:g} bytes/s: a {len(chunk)}-byte request served, the next refused (429)")


async def test_bytes_per_second_also_limits_client_streams(limited: Clients) -> None:
    token = await limited.grpc_token()
    await asyncio.sleep(1.5)  # both buckets refill
    name = station()
    frame = produce_pb2.ProduceStreamRequest(station=name, messages=[
        produce_pb2.ProducedMessage(data=b"f" * int(BYTES_PER_S * 0.6))])

    async def frames() -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
        for _ in range(4):  # 2.4 s worth of bytes, sent at once
            yield frame

    started = time.monotonic()
    try:
        reply = await limited.produce.ProduceStream(frames(), metadata=bearer(token))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return
    # or throttled: the frames took as long as the rate says
    assert reply.sent == 4 and time.monotonic() - started >= 1.5


# -- header hygiene ------------------------------------------------------------------------------------

FORBIDDEN = ("authorization", "cookie", "connection", "keep-alive", "te", "trailer", "upgrade",
             "proxy-authorization", "proxy-connection", "content-length", "host", "transfer-encoding", "x-hop")


async def consume_headers(gw: Clients, token: str, name: str, count: int) -> list[dict[str, str]]:
    reply = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
        station=name, consumer_name="h", batch_size=count, batch_max_wait_time_ms=1000), metadata=bearer(token))
    assert len(reply.messages) == count
    return [dict(m.headers) for m in reply.messages]


async def test_credentials_and_hop_by_hop_headers_never_reach_messages(gw: Clients, token: str) -> None:
    name = station()
    sent = {
        "Content-Type": "text/plain", "Cookie": "session=s3cr3t", "Proxy-Authorization": "Basic cm9vdDpwdw==",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Trailer": "X-T", "Proxy-Connection": "keep-alive",
        "Connection": "keep-alive, X-Hop", "X-Hop": "hop", "X-Kept": "kept",
    }  # fmt: skip
    status, body, _ = await gw.post(f"/stations/{name}/produce/single", raw=b"m", token=token, headers=sent)
    assert status == 200, body
    # the token in the query string is not a header either
    status, body, _ = await gw.post(f"/stations/{name}/produce/batch?authorization={token}", [1],
                                    headers={"Cookie": "a=b", "X-Kept": "kept"})
    assert status == 200, body
    # gRPC: the same names given as message headers are dropped too
    await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=name, body=text_body(b"g"), headers={"Authorization": "Bearer x", "Cookie": "c", "X-Kept": "kept"}),
        metadata=bearer(token))
    await gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(station=name, headers={"Cookie": "c"}, messages=[
        produce_pb2.ProducedMessage(data=b"b", headers={"Proxy-Authorization": "p", "X-Kept": "kept"})]),
        metadata=bearer(token))
    for headers in await consume_headers(gw, token, name, 4):
        assert headers.get("X-Kept") == "kept", headers
        leaked = [k for k in headers if k.lower() in FORBIDDEN]
        assert not leaked, headers
        assert not any(token in v or "s3cr3t" in v for v in headers.values())


async def test_upgrade_request_is_not_a_message_header_nor_a_5xx(gw: Clients, token: str) -> None:
    name = station()
    status, body, _ = await gw.post(f"/stations/{name}/produce/single", raw=b"m", token=token,
                                    headers={"Content-Type": "text/plain", "Upgrade": "h2c", "X-Kept": "kept"})
    assert status < 500, body
    if status == 200:
        [headers] = await consume_headers(gw, token, name, 1)
        assert "Upgrade" not in headers


@pytest.mark.parametrize("key", ["$memphis_producedBy", "$MEMPHIS_x", "$memphisConnectionId"])
async def test_reserved_header_keys_are_400(gw: Clients, token: str, key: str) -> None:
    status, body, _ = await gw.post(f"/stations/{station()}/produce/single", raw=b"x", token=token,
                                    headers={"Content-Type": "text/plain", key: "evil"})
    assert status == 400 and "reserved" in body["error"]
    status, body, _ = await gw.post(f"/stations/{station()}/produce/batch", [1], token=token, headers={key: "evil"})
    assert status == 400 and "reserved" in body["error"]
    for request in (
        produce_pb2.ProduceSingleRequest(station="a", body=text_body(b"x"), headers={key: "1"}),
        produce_pb2.ProduceBatchRequest(station="a", messages=[produce_pb2.ProducedMessage(data=b"x",
                                                                                          headers={key: "1"})]),
    ):
        method = gw.produce.ProduceSingle if isinstance(request, produce_pb2.ProduceSingleRequest) else \
            gw.produce.ProduceBatch
        err = await grpc_error(method(request, metadata=bearer(token)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in err.details()


@pytest.mark.parametrize(
    "headers",
    [{"X-A": "a\r\nX-Injected: 1"}, {"X-A": "a\nb"}, {"X-A": "a\rb"}, {"X-A": "nul\x00"}, {"X-A\r\nX-B": "v"},
     {"bad key": "v"}, {"": "v"}, {"a:b": "v"}],
)  # fmt: skip
async def test_crlf_in_grpc_message_headers_is_invalid_argument(gw: Clients, token: str,
                                                                headers: dict[str, str]) -> None:
    err = await grpc_error(gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
        station=station(), body=text_body(b"x"), headers=headers), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def frames() -> AsyncIterator[produce_pb2.ProduceStreamRequest]:
        yield produce_pb2.ProduceStreamRequest(station=station(), messages=[
            produce_pb2.ProducedMessage(data=b"x", headers=headers)])

    err = await grpc_error(gw.produce.ProduceStream(frames(), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


RAW_HEADER_TRICKS = [
    b"X-Fold: first\r\n second line\r\n",  # obs-fold
    b"X-Fold: first\r\n\tsecond\r\n",
    b"X-Bare: a\nX-Other: b\r\n",  # bare LF
    b"X-CR: a\rb\r\n",  # bare CR inside a value
    b"X-Nul: a\x00b\r\n",
    b"X-Latin: caf\xe9\r\n",  # not UTF-8
    b"X-Utf8: caf\xc3\xa9\r\n",
    b"Content-Type: text/caf\xe9\r\n",  # a second Content-Type, not UTF-8
    b"Authorization: Bearer caf\xe9\r\n",  # a second Authorization, not UTF-8
    b"X-Ctl: a\x01\x7fb\r\n",
    b"X-Space : v\r\n",  # space before the colon
    b" X-Lead: v\r\n",
    b"X-Empty:\r\n",
    b"X-Long: " + b"v" * 7000 + b"\r\n",
    b"$memphis_x: 1\r\n",
    b"Transfer-Encoding: chunked\r\n",  # with a Content-Length too
    b"Content-Length: 5\r\n",  # a second, different Content-Length
]


@pytest.mark.parametrize("extra", RAW_HEADER_TRICKS, ids=[f"raw{i}" for i in range(len(RAW_HEADER_TRICKS))])
async def test_raw_socket_header_tricks_are_never_a_5xx(gw: Clients, token: str, extra: bytes) -> None:
    name = station()
    url = urlsplit(gw.base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(b"POST /stations/" + name.encode() + b"/produce/single HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 4\r\n" + extra + b"Connection: close\r\n\r\nbody")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head = raw.partition(b"\r\n\r\n")[0]
    status = int(head.split(b" ", 2)[1])
    assert status < 500, raw
    assert b"Traceback" not in raw and b'File "' not in raw
    if status == 200:  # accepted: what reached the message holds no CR, LF or NUL
        for headers in await consume_headers(gw, token, name, 1):
            assert not any(c in k + v for k, v in headers.items() for c in "\r\n\x00"), headers
            assert not any(k.lower().startswith("$memphis") for k in headers)


async def test_consume_answer_fits_the_message_limit_and_loses_nothing(nats_server, tmp_path) -> None:
    """A batch larger than max_body_bytes would be auto-acked and then fail to send over gRPC:
    the gateway answers with what fits and keeps the rest, unacknowledged, for the next answers."""
    limit, size, count = 64 * 1024, 20_000, 10
    async with running_gateway(settings_for(nats_server.url, tmp_path, max_body_bytes=limit)) as gw:
        token = await gw.grpc_token()
        name = station()
        for i in range(0, count, 2):
            await gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(station=name, messages=[
                {"data": f"{j:02d}".encode() + b"x" * size} for j in (i, i + 1)]), metadata=bearer(token))
        seen: list[bytes] = []
        answers = []
        for _ in range(12):
            reply = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
                station=name, consumer_name="big", batch_size=count, batch_max_wait_time_ms=300),
                metadata=bearer(token))
            answers.append(len(reply.messages))
            assert reply.ByteSize() <= limit
            seen.extend(m.message[:2] for m in reply.messages)
            if len(seen) >= count:
                break
    print(f"\nFIGURES consume answers under a {limit}-byte limit: {answers} messages of {size} bytes")
    assert max(answers) < count  # the limit did cut batches
    assert sorted(seen) == [f"{j:02d}".encode() for j in range(count)]  # none lost, none twice


async def test_messages_awaiting_acknowledgement_are_bounded(nats_server, tmp_path) -> None:
    """``max_inflight_produce_bytes`` bounds what all calls hold while the broker acknowledges: beyond it
    a call is 503 / UNAVAILABLE with Retry-After and nothing of it is stored; the others are stored whole.
    One batch larger than the limit still goes through when nothing else is in flight."""
    per_batch = 400  # each message counted as its bytes, its header block and 512: a batch ~250 KB
    limit = 600_000  # two such batches in flight, not three
    settings = settings_for(nats_server.url, tmp_path, max_inflight_produce_bytes=limit)
    async with running_gateway(settings) as gw:
        token = await gw.rest_token()
        name = station()
        body = json.dumps([{"i": i} for i in range(per_batch)]).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

        async def rest_batch() -> tuple[int, Any, Any]:
            return await gw.post(f"/stations/{name}/produce/batch", raw=body, headers=headers)

        async def grpc_batch() -> grpc.StatusCode:
            try:
                await gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(
                    station=name, messages=[{"data": b'{"i":%d}' % i} for i in range(per_batch)]),
                    metadata=bearer(token))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert "awaiting the broker's acknowledgement" in (exc.details() or "")
                assert ("retry-after", "1") in tuple(exc.initial_metadata() or ())
                return exc.code()
            return grpc.StatusCode.OK

        assert (await rest_batch())[0] == 200  # the station exists; alone, one batch always fits
        rest = await asyncio.gather(*[rest_batch() for _ in range(24)])
        statuses = [status for status, _, _ in rest]
        for status, reply, hdrs in rest:
            if status == 503:
                assert "awaiting the broker's acknowledgement" in reply["error"], reply
                assert hdrs.get("Retry-After") == "1"
        codes = await asyncio.gather(*[grpc_batch() for _ in range(32)])
        grpc_codes = sorted(c.name for c in codes)
        print(f"\nFIGURES in-flight produce limit {limit} B: REST {sorted(statuses)}, gRPC {grpc_codes}")
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        stored_batches = 1 + statuses.count(200) + codes.count(grpc.StatusCode.OK)
        big = json.dumps([{"i": i} for i in range(3 * per_batch)]).encode()  # ~750 KB counted: over the limit
        status, reply, _ = await gw.post(f"/stations/{name}/produce/batch", raw=big, headers=headers)
        assert status == 200, reply
        status, info, _ = await gw.get(f"/stations/{name}", token=token)
        assert status == 200, info
        assert int(info["total_messages"]) == stored_batches * per_batch + 3 * per_batch  # none partly stored
