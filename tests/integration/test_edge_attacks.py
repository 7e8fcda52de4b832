"""Attacks on the HTTP and gRPC edge (issue 10), each with the figure it produces (run with ``-s``).

- a batch of tiny elements is refused by its count before any element is materialised;
- a caller without a token is refused before its body is read; a body that trickles is 408 after
  ``body_read_timeout_s``; bodies in flight are bounded by ``max_inflight_body_bytes`` (503);
  a client trickling its headers is closed after ``http_keepalive_s``;
- one HTTP/2 connection holds at most ``grpc_max_streams`` streams;
- JSON nested deeper than 1024 levels is a 400 / INVALID_ARGUMENT, never a 500;
- consume answers are bounded by bytes (``max_consume_bytes``) over REST as over gRPC, the rest carried;
- credentials in the query string of ``/auth/authenticate`` are refused.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from memgw.v1 import auth_pb2, consume_pb2, produce_pb2

from gateway.broker.natsutil import pull
from tests.conftest import ROOT_PASSWORD, ROOT_USER, connect_root
from tests.harness import Clients, bearer, running_gateway, settings_for

MAX_BATCH = 10
BODY_LIMIT = 4 * 1024 * 1024
BODY_TIMEOUT_S = 1.0
INFLIGHT = 2 * BODY_LIMIT
KEEPALIVE_S = 2.0
GRPC_STREAMS = 20
CONSUME_BYTES = 256 * 1024


@pytest.fixture(scope="module")
async def gw(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    settings = settings_for(
        nats_server.url, tmp_path_factory.mktemp("gw"), max_body_bytes=BODY_LIMIT, max_batch_messages=MAX_BATCH,
        body_read_timeout_s=BODY_TIMEOUT_S, max_inflight_body_bytes=INFLIGHT, http_keepalive_s=KEEPALIVE_S,
        grpc_max_streams=GRPC_STREAMS, max_consume_bytes=CONSUME_BYTES,
    )  # fmt: skip
    async with running_gateway(settings) as clients:
        yield clients


@pytest.fixture(scope="module")
async def token(gw: Clients) -> str:
    return await gw.rest_token()


def station() -> str:
    return f"edge-{uuid.uuid4().hex[:10]}"


def http_port(gw: Clients) -> int:
    return int(gw.base.rsplit(":", 1)[1])


async def grpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- 1. a batch of tiny elements ---------------------------------------------------------------------


async def test_tiny_element_batch_is_refused_by_count_without_materialising(gw: Clients, token: str) -> None:
    """``[0,0,...]``: 500k elements in 1 MB. Before: parsed whole, one bytes object and one OutMessage
    per element before the count was checked (hundreds of MB traced, seconds of blocked loop)."""
    body = b"[" + b",".join([b"0"] * 500_000) + b"]"
    path = f"/stations/{station()}/produce/batch"
    gc.collect()
    tracemalloc.start()
    try:
        started = time.perf_counter()
        status, answer, _ = await gw.post(path, raw=body, token=token, headers={"Content-Type": "application/json"})
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n[batch of 500k tiny elements, 1 MB] REST {status} in {took * 1000:.0f} ms, "
          f"peak traced {peak / 1e6:.1f} MB")
    assert status == 400 and "too many messages" in answer["error"], answer
    assert peak < 30e6, f"{peak / 1e6:.0f} MB traced for a 1 MB body"

    messages = [produce_pb2.ProducedMessage()] * 200_000
    tracemalloc.start()
    try:
        started = time.perf_counter()
        err = await grpc_error(gw.produce.ProduceBatch(
            produce_pb2.ProduceBatchRequest(station=station(), messages=messages), metadata=bearer(token)))
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"[batch of 200k empty messages] gRPC {err.code().name} in {took * 1000:.0f} ms, "
          f"peak traced {peak / 1e6:.1f} MB")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "too many messages" in (err.details() or "")


async def test_batch_elements_are_taken_one_at_a_time(gw: Clients, token: str) -> None:
    name = station()
    body = b' [ {"a": [1, 2]} ,\n"x", 123456789012345678901234567890, null ] '
    status, answer, _ = await gw.post(f"/stations/{name}/produce/batch", raw=body, token=token,
                                      headers={"Content-Type": "application/json"})
    assert status == 200, answer
    reply = await gw.consume.ConsumeBatch(consume_pb2.ConsumeBatchRequest(
        station=name, consumer_name="c", batch_size=10, batch_max_wait_time_ms=2000), metadata=bearer(token))
    assert [m.message for m in reply.messages] == [b'{"a":[1,2]}', b'"x"', b"123456789012345678901234567890", b"null"]
    for bad, why in ((b"[1,]", "not JSON"), (b"[1 2]", "not JSON"), (b"[NaN]", "not JSON"), (b"{}", "array"),
                     (b"[1]x", "not JSON"), (b'["\\ud800"]', "surrogate")):
        status, answer, _ = await gw.post(f"/stations/{name}/produce/batch", raw=bad, token=token,
                                          headers={"Content-Type": "application/json"})
        assert status == 400 and why in answer["error"], (bad, answer)


# -- 4. JSON nested too deeply -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1025, 5000, 100_000])
async def test_deep_json_is_400_everywhere(gw: Clients, token: str, depth: int, caplog) -> None:
    deep = b"[" * depth + b"]" * depth
    cases = [
        (f"/stations/{station()}/produce/batch", b"[" + deep + b"]", "nested"),
        (f"/stations/{station()}/consume/batch", b'{"consumer_name": ' + deep + b"}", "nested deeper than 1024"),
        ("/auth/authenticate", b'{"username": ' + deep + b"}", "nested deeper than 1024"),
        ("/auth/refreshToken", b'{"jwt_refresh_token": ' + deep + b"}", "nested deeper than 1024"),
    ]
    for path, body, why in cases:
        status, answer, _ = await gw.post(path, raw=body, token=token, headers={"Content-Type": "application/json"})
        message = answer.get("error") or answer.get("message")
        assert status == 400 and why in message, (path, status, answer)
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    err = await grpc_error(gw.produce.ProduceBatch(produce_pb2.ProduceBatchRequest(
        station=station(), body={"content_type": "application/json", "data": b"[" + deep + b"]"}),
        metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested" in (err.details() or "")


# -- 2. unauthenticated bodies, slow bodies, bodies in flight, slow headers ------------------------------------------


async def raw_request(gw: Clients, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(gw))
    writer.write(head)
    await writer.drain()
    return reader, writer


def post_head(path: str, length: int, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


async def status_and_closed(reader: asyncio.StreamReader, wait_s: float) -> tuple[int, bool, float]:
    """The response status, whether the server then closed the connection, and when it answered."""
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait_s)
    took = time.monotonic() - started
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    try:
        closed = await asyncio.wait_for(reader.read(1), 4.0) == b""
    except TimeoutError:
        closed = False
    return status, closed, took


async def test_no_token_is_refused_before_the_body_is_read(gw: Clients) -> None:
    """Before: the gateway read the whole body (up to max_body_bytes) and only then checked the token."""
    path = f"/stations/{station()}/produce/batch"
    reader, writer = await raw_request(gw, post_head(path, BODY_LIMIT - 1) + b"[1,")
    try:
        status, closed, took = await status_and_closed(reader, 3.0)
    finally:
        writer.close()
    print(f"\n[tokenless body of {BODY_LIMIT - 1} bytes, 3 sent] {status} after {took * 1000:.0f} ms, "
          f"closed={closed}")
    assert status == 401 and closed
    # and a wrong route is refused before its body too
    reader, writer = await raw_request(gw, post_head("/nowhere", BODY_LIMIT - 1) + b"[1,")
    try:
        status, closed, _ = await status_and_closed(reader, 3.0)
    finally:
        writer.close()
    assert status == 404


async def test_100_continue_only_once_admitted(gw: Clients, token: str) -> None:
    """A client that waits for ``100 Continue`` is told 401 instead when it has no valid token."""
    path = f"/stations/{station()}/produce/single"
    for auth, first in ((None, b"HTTP/1.1 401"), (token, b"HTTP/1.1 100 Continue")):
        head = post_head(path, 2, auth).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
        reader, writer = await raw_request(gw, head)
        try:
            line = await asyncio.wait_for(reader.readline(), 3.0)
            assert line.startswith(first), line
            if auth:
                writer.write(b"ok")
                await reader.readline()
                assert (await asyncio.wait_for(reader.readline(), 3.0)).startswith(b"HTTP/1.1 200"), line
        finally:
            writer.close()


async def test_a_trickled_body_is_408_after_the_body_deadline(gw: Clients, token: str) -> None:
    """Before: no deadline on reading a body; a client sending a byte now and then held its connection for good."""
    path = f"/stations/{station()}/produce/batch"
    reader, writer = await raw_request(gw, post_head(path, 1000, token) + b"[")

    async def trickle() -> None:
        for _ in range(20):
            await asyncio.sleep(0.2)
            writer.write(b" ")
            await writer.drain()

    dripping = asyncio.create_task(trickle())
    try:
        status, closed, took = await status_and_closed(reader, BODY_TIMEOUT_S + 3)
    finally:
        dripping.cancel()
        writer.close()
    print(f"\n[body trickled 1 byte / 200 ms] {status} after {took:.2f} s (deadline {BODY_TIMEOUT_S} s), "
          f"closed={closed}")
    assert status == 408 and closed and took < BODY_TIMEOUT_S + 1
    # a client stream (NDJSON) that sends nothing is 408 too
    reader, writer = await raw_request(gw, (
        f"POST /produce/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    try:
        status, _, took = await status_and_closed(reader, BODY_TIMEOUT_S + 3)
    finally:
        writer.close()
    assert status == 408, status


async def test_bodies_in_flight_are_bounded(gw: Clients, token: str) -> None:
    """Two bodies of the largest size fill the budget; a third is 503 with Retry-After at once."""
    path = f"/stations/{station()}/produce/single"
    held = [await raw_request(gw, post_head(path, BODY_LIMIT, token) + b"x" * 1000) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)
        reader, writer = await raw_request(gw, post_head(path, BODY_LIMIT, token) + b"x")
        try:
            started = time.monotonic()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0)
            took = time.monotonic() - started
        finally:
            writer.close()
        print(f"\n[3rd body while {INFLIGHT} bytes are in flight] {head.split(b' ', 2)[1].decode()} "
              f"after {took * 1000:.0f} ms")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.2)
    # the budget is given back: a body is taken again
    status, _, _ = await gw.post(path, raw=b"ok", token=token, headers={"Content-Type": "text/plain"})
    assert status == 200
    assert gw.gateway._runner is not None


async def test_headers_trickled_forever_are_closed_by_the_keepalive(gw: Clients) -> None:
    """aiohttp's keep-alive timer runs from the connection's start until a whole request head is
    parsed: a client trickling header bytes is closed after http_keepalive_s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(gw))
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    closed_after = None
    try:
        for i in range(int(KEEPALIVE_S * 4) + 10):
            await asyncio.sleep(0.25)
            if reader.at_eof():
                break
            try:
                writer.write(f"X-{i}: y\r\n".encode())
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                break
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    print(f"\n[headers trickled 1 line / 250 ms] closed after {closed_after:.1f} s (keep-alive {KEEPALIVE_S} s)")
    assert closed_after < KEEPALIVE_S + 2


# -- 3. gRPC: streams per connection -----------------------------------------------------------------------


async def test_one_http2_connection_holds_a_bounded_number_of_streams(gw: Clients) -> None:
    """A client that ignores the server's SETTINGS opens 10x the limit at once: the server refuses
    the excess (RST_STREAM). Before: no limit; one tokenless connection held 20,000 header-only
    streams (+317 MB)."""
    port = gw.gateway.ports.grpc if gw.gateway.ports else 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    attempted = GRPC_STREAMS * 10
    for _ in range(attempted):  # before the server's SETTINGS are read: h2 does not stop us
        conn.send_headers(conn.get_next_available_stream_id(), [
            (":method", "POST"), (":scheme", "http"), (":path", "/memgw.v1.ProduceService/ProduceSingle"),
            (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers"),
        ])
    writer.write(conn.data_to_send())
    await writer.drain()
    reset: set[int] = set()
    advertised = None
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                continue
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    setting = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    if setting is not None:
                        advertised = setting.new_value
                elif isinstance(event, h2.events.StreamReset | h2.events.StreamEnded):
                    reset.add(event.stream_id)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    held = attempted - len(reset)
    print(f"\n[{attempted} header-only gRPC streams on one connection] advertised limit {advertised}, "
          f"refused {len(reset)}, held {held}")
    assert advertised == GRPC_STREAMS
    assert held <= GRPC_STREAMS


# -- 5. consume answers bounded by bytes ----------------------------------------------------------------------


async def test_consume_answers_are_bounded_by_bytes_and_nothing_is_lost(gw: Clients, token: str) -> None:
    name = station()
    count, size = 8, 100 * 1024
    for i in range(count):
        status, answer, _ = await gw.post(f"/stations/{name}/produce/single", raw=bytes([65 + i]) * size,
                                          token=token, headers={"Content-Type": "text/plain"})
        assert status == 200, answer
    got: list[bytes] = []
    answers = []
    for _ in range(count):
        status, answer, _ = await gw.post(f"/stations/{name}/consume/batch", {
            "consumer_name": "c", "batch_size": count, "batch_max_wait_time_ms": 500}, token=token)
        assert status == 200, answer
        if not answer:
            break
        answers.append(len(answer))
        got += [m["message"].encode() for m in answer]
        if len(got) >= count:
            break
    print(f"\n[consume {count} x {size // 1024} KB, REST, max_consume_bytes {CONSUME_BYTES // 1024} KB] "
          f"answers of {answers} messages")
    assert max(answers) * size <= CONSUME_BYTES + size
    assert sorted(m[:1] for m in got) == [bytes([65 + i]) for i in range(count)]  # none lost, none twice


# -- 6. credentials in the query string --------------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    f"username={ROOT_USER}&password={ROOT_PASSWORD}", f"password={ROOT_PASSWORD}", "connection_token=abc",
    "connectionToken=abc", "username=root",
])
async def test_credentials_in_the_query_string_are_refused(gw: Clients, query: str) -> None:
    body = {"username": ROOT_USER, "password": ROOT_PASSWORD}
    status, answer, _ = await gw.post(f"/auth/authenticate?{query}", body)
    assert status == 400 and "JSON body" in answer["message"], answer
    assert ROOT_PASSWORD not in json.dumps(answer)


async def test_account_id_in_the_query_string_still_works(gw: Clients) -> None:
    status, answer, _ = await gw.post("/auth/authenticate?accountId=1", {"username": ROOT_USER,
                                                                          "password": ROOT_PASSWORD})
    assert status == 200 and answer["jwt"], answer
    reply = await gw.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER, password=ROOT_PASSWORD))
    assert reply.jwt


async def test_a_pull_is_bounded_by_bytes(nats_server) -> None:
    """The broker sends at most max_bytes per pull (nats-py's fetch cannot ask: it took the whole
    batch, 40 x 7 MB, which tripped nats-server's slow-consumer limit); nothing is lost."""
    nc = await connect_root(nats_server)
    js = nc.jetstream()
    name = f"pull-{uuid.uuid4().hex[:8]}"
    try:
        await js.add_stream(name=name, subjects=[f"{name}.>"])
        for i in range(10):
            await js.publish(f"{name}.x", bytes([65 + i]) * 1_000_000)
        psub = await js.pull_subscribe(f"{name}.>", durable="d", stream=name)
        first = await pull(psub, 10, 3_100_000, 2.0)
        rest: list[Any] = []
        for _ in range(10):
            if len(first) + len(rest) >= 10:
                break
            rest += await pull(psub, 10, 3_100_000, 0.5)
        print(f"\n[pull of 10 x 1 MB with max_bytes 3.1 MB] first pull {len(first)} messages, "
              f"then {len(rest)} in later pulls")
        assert 1 <= len(first) <= 3
        assert [m.data[:1] for m in first + rest] == [bytes([65 + i]) for i in range(10)]
        for m in first + rest:
            await m.ack()
    finally:
        await js.delete_stream(name)
        await nc.close()
