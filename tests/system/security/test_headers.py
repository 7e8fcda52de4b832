"""Issue 10, item 3 and the medium item on header names: message headers the broker reads as its own.

`curl -H 'Status: 503' -d evil` between two good messages: nats-py read the stored message as a
JetStream status frame, the next consume answered 503 and a neighbouring good message was not
delivered. Every broker-reserved name (`Status`, `Description`, `Nats-*` control headers) must be
refused on produce with a 400 naming it, over REST (single and batch) and in the gRPC headers map;
nothing of it stored; the good neighbours all consumed; later consumes 200. Header names with NUL
or non-ASCII characters are accepted today and then dropped on consume: refuse them at produce.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import nats
import pytest
from memgw.v1 import produce_pb2

from tests.system.security.conftest import Api, GatewayProcess, bearer, figure, stored_messages

RESERVED = {
    "Status": "503",
    "Description": "No Messages",
    "Nats-Rollup": "all",
    "Nats-TTL": "1s",
    "Nats-Expected-Last-Sequence": "999",
    "Nats-Expected-Stream": "some-other$1",
    "Nats-Msg-Id": "evil-1",
    "status": "404",
}


def carries(msg: Any, name: str) -> bool:
    return any(k.lower() == name.lower() for k in (msg.headers or {}))


async def drain(api: Api, station: str, want: set[str], seconds: float = 6.0) -> tuple[list[int], set[str]]:
    """Consume until every message of ``want`` arrived or ``seconds`` passed: (statuses, payloads seen)."""
    statuses: list[int] = []
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not want <= seen:
        status, body = await api.consume(station, batch_size=10, wait_ms=300)
        statuses.append(status)
        if status == 200 and isinstance(body, list):
            seen.update(m["message"] for m in body)
        elif status != 200:
            await asyncio.sleep(0.2)
    return statuses, seen


def names_header(body: Any, name: str) -> bool:
    return name.lower() in str(body).lower()


@pytest.mark.parametrize("name", list(RESERVED))
async def test_rest_single_reserved_header_is_refused_and_neighbours_survive(
    api: Api, gw: GatewayProcess, nc: nats.NATS, station: str, name: str
) -> None:
    good1 = (await api.produce_text(station, f"good-1-{name}"))[0]
    evil_status, evil_body = await api.produce_text(station, "evil", headers={name: RESERVED[name]})
    good2 = (await api.produce_text(station, f"good-2-{name}"))[0]
    want = {f"good-1-{name}", f"good-2-{name}"}
    statuses, seen = await drain(api, station, want)
    later, _ = await api.consume(station, batch_size=10, wait_ms=200)
    stored = [m for m in await stored_messages(nc, station) if carries(m, name)]
    lost = len(want - seen)
    figure(f"header-{name}-rest-single",
           f"produce good {good1}/{good2}, evil {evil_status} {str(evil_body)[:80]!r}; consumes {statuses} then "
           f"{later}; good messages not delivered within 6 s: {lost}; stored with {name}: {len(stored)}",
           evil_status=evil_status, consume_statuses=statuses, lost=lost, stored=len(stored))
    assert good1 == 200 and good2 == 200
    assert evil_status == 400 and names_header(evil_body, name), (evil_status, evil_body)
    assert not stored
    assert lost == 0
    assert set(statuses) == {200} and later == 200


@pytest.mark.parametrize("name", list(RESERVED))
async def test_rest_batch_reserved_header_is_refused(
    api: Api, gw: GatewayProcess, nc: nats.NATS, station: str, name: str
) -> None:
    token = await api.token()
    path = f"/stations/{station}/produce/batch"
    before, _, _ = await api.post(path, json_body=["good-a"], token=token)
    evil_status, evil_body, _ = await api.post(path, json_body=["evil-1", "evil-2"], token=token,
                                               headers={name: RESERVED[name]})
    after, _, _ = await api.post(path, json_body=["good-b"], token=token)
    statuses, seen = await drain(api, station, {'"good-a"', '"good-b"'})
    stored = [m for m in await stored_messages(nc, station) if carries(m, name)]
    lost = len({'"good-a"', '"good-b"'} - seen)
    figure(f"header-{name}-rest-batch",
           f"evil batch {evil_status} {str(evil_body)[:80]!r}; neighbours {before}/{after}; consumes {statuses}; "
           f"lost {lost}; stored with {name}: {len(stored)}",
           evil_status=evil_status, consume_statuses=statuses, lost=lost, stored=len(stored))
    assert before == 200 and after == 200
    assert evil_status == 400 and names_header(evil_body, name), (evil_status, evil_body)
    assert not stored
    assert lost == 0 and set(statuses) == {200}


@pytest.mark.parametrize("name", ["Status", "Nats-Rollup", "Nats-TTL", "Nats-Msg-Id", "status"])
async def test_grpc_reserved_header_in_headers_map_is_refused(
    api: Api, gw: GatewayProcess, nc: nats.NATS, station: str, name: str
) -> None:
    md = bearer(await api.grpc_token())
    await api.produce_text(station, "exists")
    results: dict[str, Any] = {}
    calls = {
        "single": lambda: api.produce_rpc.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, headers={name: RESERVED[name]},
            body={"content_type": "text/plain", "data": b"evil-single"}), metadata=md),
        "batch-shared": lambda: api.produce_rpc.ProduceBatch(produce_pb2.ProduceBatchRequest(
            station=station, headers={name: RESERVED[name]},
            messages=[produce_pb2.ProducedMessage(data=b"evil-shared")]), metadata=md),
        "batch-own": lambda: api.produce_rpc.ProduceBatch(produce_pb2.ProduceBatchRequest(
            station=station, messages=[produce_pb2.ProducedMessage(data=b"good-own"),
                                       produce_pb2.ProducedMessage(data=b"evil-own",
                                                                   headers={name: RESERVED[name]})]),
            metadata=md),
    }
    for label, call in calls.items():
        try:
            await call()
            results[label] = ("OK", "")
        except grpc.aio.AioRpcError as exc:
            results[label] = (exc.code().name, exc.details() or "")
    statuses, _ = await drain(api, station, {"never"}, seconds=1.5)
    stored = [m for m in await stored_messages(nc, station) if carries(m, name)]
    figure(f"header-{name}-grpc", f"{ {k: v[0] for k, v in results.items()} }; consumes {statuses}; "
           f"stored with {name}: {len(stored)}", results={k: v[0] for k, v in results.items()}, stored=len(stored))
    for label, (code, details) in results.items():
        assert code == "INVALID_ARGUMENT" and name.lower() in details.lower(), (label, code, details)
    assert not stored
    assert set(statuses) == {200}


async def raw_request(gw: GatewayProcess, head: bytes, body: bytes) -> int:
    """Send a hand-written HTTP/1.1 request; the answer's status code (0: connection closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    finally:
        writer.close()


BAD_NAMES = {"nul": "X-A\x00B", "latin1": "X-\u00c4rger", "kelvin": "X-\u212a", "del": "X-A\x7fB"}


@pytest.mark.parametrize("kind", list(BAD_NAMES))
async def test_header_names_with_nul_or_non_ascii_are_refused_at_produce(
    api: Api, gw: GatewayProcess, nc: nats.NATS, station: str, kind: str
) -> None:
    name = BAD_NAMES[kind]
    token = await api.token()
    await api.produce_text(station, "exists")
    head = (f"POST /stations/{station}/produce/single HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: text/plain\r\n").encode() + name.encode() + b": v\r\n"
    rest = await raw_request(gw, head, b"evil-rest")
    md = bearer(await api.grpc_token())
    try:
        await api.produce_rpc.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=station, headers={name: "v"}, body={"content_type": "text/plain", "data": b"evil-grpc"}),
            metadata=md)
        grpc_code = "OK"
    except grpc.aio.AioRpcError as exc:
        grpc_code = exc.code().name
    stored = [m.data for m in await stored_messages(nc, station) if m.data.startswith(b"evil")]
    figure(f"header-name-{kind}", f"REST {rest}, gRPC {grpc_code}; stored evil messages: {len(stored)}",
           rest=rest, grpc=grpc_code, stored=len(stored))
    assert rest == 400
    assert grpc_code == "INVALID_ARGUMENT"
    assert not stored
