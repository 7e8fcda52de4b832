"""The REST transcoder end to end (gateway.transcoding), over real loopback sockets, with fake servicers.

Two contracts are served: the product's (``gateway.rpc.contract.SERVICES``, with the seed's routes and
error shapes) and the echo test contract of test_httprules.py (templates, verbs, ``**``, query
parameters, ``HttpBody`` both ways, streaming). The servicers are fakes that record what they got,
behind a Guard that wants ``Authorization: Bearer good-token`` on non-public methods.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memgw.v1 import auth_pb2, consume_pb2, monitoring_pb2, produce_pb2
from yarl import URL

from gateway.core.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from gateway.rpc.call import CallContext, Endpoint, build_endpoints
from gateway.rpc.contract import SERVICES
from gateway.transcoding.server import ExtraRoute, RestHandler, RestOptions, build_rest_handler, rest_runner
from tests.unit.test_httprules import message_class, service

TOKEN = "good-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 4096

Echo = message_class("EchoRequest")
EchoResponse = message_class("EchoResponse")


# ---------------------------------------------------------------- fakes


def served(servicers: list[Any]) -> list[Any]:
    """The product's services that ``servicers`` implement (the fakes cover the message services)."""
    names = {s.SERVICE for s in servicers}
    return [s for s in SERVICES if s.full_name in names]


class TokenGuard:
    meters_bytes = False

    def charge(self, ctx: CallContext, nbytes: int) -> None:
        return None

    def admit(self, endpoint: Endpoint, ctx: CallContext) -> None:
        if not endpoint.public and ctx.metadata.get("authorization") != f"Bearer {TOKEN}":
            raise Unauthenticated("no or bad token")

    def authorize(self, endpoint: Endpoint, ctx: CallContext, request: Any) -> None:
        return None  # every token holder may do everything here

    def release(self, endpoint: Endpoint, ctx: CallContext) -> None:
        return None


@dataclass
class Calls:
    """What the fake servicers received, newest last; ``failures`` turns on the scripted errors."""

    failures: bool = True
    log: list[tuple[str, Any, CallContext]] = field(default_factory=list)
    gate: asyncio.Event | None = None

    def add(self, name: str, request: Any, ctx: CallContext) -> None:
        self.log.append((name, request, ctx))

    def last(self, name: str) -> tuple[Any, CallContext]:
        for n, request, ctx in reversed(self.log):
            if n == name:
                return request, ctx
        raise LookupError(name)


class FakeProduce:
    SERVICE = "memgw.v1.ProduceService"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def ProduceSingle(self, request: Any, ctx: CallContext) -> Message:
        self.calls.add("ProduceSingle", request, ctx)
        if self.calls.failures:
            match request.station:
                case "schema":
                    raise InvalidArgument("Schema validation has failed: missing field")
                case "busy":
                    raise ResourceExhausted("too many requests", retry_after=1.2)
                case "boom":
                    raise RuntimeError("secret internals")
                case "slow":
                    await asyncio.sleep(5)
        ctx.response_headers["X-Produced"] = "1"
        return produce_pb2.ProduceSingleResponse(success=True)

    async def ProduceBatch(self, request: Any, ctx: CallContext) -> Message:
        self.calls.add("ProduceBatch", request, ctx)
        if self.calls.failures and request.station == "partial":
            detail = produce_pb2.ProduceBatchFailure(errors=["e1", "e2"], fail=2, sent=1)
            raise InvalidArgument("partial failure", detail=detail)
        return produce_pb2.ProduceBatchResponse(success=True)

    async def ProduceStream(self, requests: AsyncIterator[Any], ctx: CallContext) -> Message:
        frames = []
        async for frame in requests:
            frames.append(frame)
            if self.calls.gate is not None:
                self.calls.gate.set()
        self.calls.add("ProduceStream", frames, ctx)
        return produce_pb2.ProduceStreamResponse(success=True, sent=sum(len(f.messages) for f in frames))


class FakeConsume:
    SERVICE = "memgw.v1.ConsumeService"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def ConsumeBatch(self, request: Any, ctx: CallContext) -> Message:
        self.calls.add("ConsumeBatch", request, ctx)
        if not request.consumer_name:
            raise InvalidArgument("Consumer name is required")
        message = consume_pb2.ConsumedMessage(message=b'{"message": "x"}', headers={"Content-Type": "application/json"})
        return consume_pb2.ConsumeBatchResponse(messages=[message])

    async def Ack(self, request: Any, ctx: CallContext) -> Message:
        return consume_pb2.AckResponse(success=True, acked=len(request.ack_ids))

    async def Subscribe(self, request: Any, ctx: CallContext) -> AsyncIterator[Message]:
        self.calls.add("Subscribe", request, ctx)
        if self.calls.failures and request.consumer_name == "refused":
            raise PermissionDenied("not your station")
        for i in range(3):
            yield consume_pb2.SubscribeResponse(messages=[consume_pb2.ConsumedMessage(message=b"m%d" % i)])
        if self.calls.failures and request.consumer_name == "breaks":
            raise Unavailable("broker went away")

    async def ConsumeEvents(self, request: Any, ctx: CallContext) -> AsyncIterator[Message]:
        self.calls.add("ConsumeEvents", request, ctx)
        yield consume_pb2.ConsumeEventsResponse(id="1:0")
        for i in range(1, 3):
            yield consume_pb2.ConsumeEventsResponse(
                id=f"1:{i}", message=consume_pb2.ConsumedMessage(message=b"m%d" % i, sequence=i, partition=1))
        if request.consumer_name == "breaks":
            raise Unavailable("broker went away")


class FakeAuth:
    SERVICE = "memgw.v1.AuthService"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Authenticate(self, request: Any, ctx: CallContext) -> Message:
        self.calls.add("Authenticate", request, ctx)
        if request.password != "secret":
            raise Unauthenticated("wrong password")
        account = request.account_id if request.HasField("account_id") else 1
        return auth_pb2.AuthenticateResponse(
            expires_in=900000, jwt=f"jwt-{account}", jwt_refresh_token="r", refresh_token_expires_in=18000000
        )

    async def RefreshToken(self, request: Any, ctx: CallContext) -> Message:
        raise Unauthenticated("never")


class FakeMonitoring:
    SERVICE = "memgw.v1.MonitoringService"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.down = False

    async def Status(self, request: Any, ctx: CallContext) -> Message:
        if self.down:
            raise Unavailable("broker unreachable", detail=monitoring_pb2.StatusResponse(status="broker unreachable"))
        return monitoring_pb2.StatusResponse(status="ok")

    async def GetResourcesUtilization(self, request: Any, ctx: CallContext) -> Message:
        if self.down:
            raise Unavailable("no figures")
        return monitoring_pb2.GetResourcesUtilizationResponse(cpu=1.5, memory=2.5, storage=2**40)


class FakeEcho:
    SERVICE = "memgw.testing.v1.EchoService"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def _echo(self, name: str, request: Any, ctx: CallContext) -> Message:
        self.calls.add(name, request, ctx)
        if self.calls.failures and request.id == "gone":
            raise NotFound("no such item")
        return EchoResponse(echo=request)

    async def Get(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Get", request, ctx)

    async def Publish(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Publish", request, ctx)

    async def Typed(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Typed", request, ctx)

    async def Update(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Update", request, ctx)

    async def Remove(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Remove", request, ctx)

    async def Custom(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Custom", request, ctx)

    async def Unbound(self, request: Any, ctx: CallContext) -> Message:
        return await self._echo("Unbound", request, ctx)

    async def Files(self, request: Any, ctx: CallContext) -> Message:
        return EchoResponse(items=request.id.split("/"))

    async def Download(self, request: Any, ctx: CallContext) -> Message:
        from google.api import httpbody_pb2

        return httpbody_pb2.HttpBody(content_type="text/csv", data=f"id\n{request.id}\n".encode())

    async def Upload(self, request: Any, ctx: CallContext) -> Message:
        self.calls.add("Upload", request, ctx)
        return EchoResponse(raw=request)

    async def Watch(self, request: Any, ctx: CallContext) -> AsyncIterator[Message]:
        if self.calls.failures and request.id == "gone":
            raise NotFound("no such watch")
        if request.id == "forever":
            try:
                while True:
                    yield EchoResponse(items=["tick"])
                    await asyncio.sleep(0.005)
            finally:
                self.calls.add("WatchClosed", request, ctx)
        for i in range(3):
            if i == 1 and request.id == "gated":
                assert self.calls.gate is not None
                await self.calls.gate.wait()  # the client must have read line 0 by now
            yield EchoResponse(items=[str(i)])
            if self.calls.failures and request.id == "breaks" and i == 1:
                raise Unavailable("watch broke")

    async def Collect(self, requests: AsyncIterator[Any], ctx: CallContext) -> Message:
        return EchoResponse(items=[r.id async for r in requests])


async def _root(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
    return web.json_response({"service": "memphis-gateway"})


async def _file(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
    return web.Response(text=params["path"])


async def _refuse(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
    raise PermissionDenied("metrics are private")


async def _crash(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
    raise RuntimeError("secret internals")


EXTRA = (
    ExtraRoute(method="GET", template="/", handler=_root),
    ExtraRoute(method="GET", template="/static/{path=**}", handler=_file),
    ExtraRoute(method="GET", template="/metrics", handler=_refuse),
    ExtraRoute(method="GET", template="/crash", handler=_crash),
)


def make_app(calls: Calls, monitoring: FakeMonitoring, options: RestOptions) -> RestHandler:
    servicers = [FakeAuth(calls), FakeProduce(calls), FakeConsume(calls), monitoring]
    endpoints = build_endpoints(served(servicers), servicers, TokenGuard())
    endpoints += build_endpoints([service("EchoService")], [FakeEcho(calls)], TokenGuard())
    return build_rest_handler(endpoints, options)


@dataclass
class Server:
    url: str
    calls: Calls
    monitoring: FakeMonitoring
    session: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        url = URL(self.url + path, encoded=True)
        async with self.session.request(method, url, data=body, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    calls = Calls()
    monitoring = FakeMonitoring(calls)
    options = RestOptions(max_body_bytes=LIMIT, extra_routes=EXTRA, unbound_methods=True)
    runner = rest_runner(make_app(calls, monitoring, options))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Server(f"http://127.0.0.1:{port}", calls, monitoring, session)
    await runner.cleanup()


async def raw_request(server: Server, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (for headers aiohttp's client would rewrite); read one response."""
    host, _, port = server.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    if headers.get("Transfer-Encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out


def js(body: bytes) -> Any:
    return orjson.loads(body)


# ---------------------------------------------------------------- routing and templates

ROUTES = [
    # (method, path, body, status, check)
    ("GET", "/monitoring/status", None, 200, {"status": "ok"}),
    ("HEAD", "/monitoring/status", None, 200, None),
    ("GET", "/v1/echo/abc", None, 200, {"echo.id": "abc"}),
    ("GET", "/v1/echo/a%20b%2Fc", None, 200, {"echo.id": "a b/c"}),
    ("GET", "/v1/echo/abc/n/-5", None, 200, {"echo.id": "abc", "echo.n32": -5}),
    ("POST", "/v1/echo:search?id=q", b'{"name": "n", "tags": ["t"]}', 200,
     {"echo.id": "q", "echo.inner": {"name": "n", "big": 0, "tags": ["t"], "color": "COLOR_UNSPECIFIED"}}),
    ("POST", "/v1/topics/t1:publish", b'{"id": "x", "inner": {"name": "ignored", "big": 7}}', 200,
     {"echo.id": "x", "echo.inner.name": "topics/t1", "echo.inner.big": 7}),
    ("POST", "/v1/other/t1:publish", b"{}", 404, {"code": 5, "message": "Not Found: no route POST /v1/other/t1:publish; GET /docs lists the API"}),  # noqa: E501
    ("POST", "/v1/topics/t1", b"{}", 404, {"code": 5, "message": "Not Found: no route POST /v1/topics/t1; GET /docs lists the API"}),  # noqa: E501
    ("GET", "/v1/files/a/b/c.txt", None, 200, ["a", "b", "c.txt"]),
    ("GET", "/v1/files/a%2Fb/c", None, 200, ["a%2Fb", "c"]),
    ("GET", "/v1/typed/a,b/true/GREEN/7/1970-01-01T00:00:01Z", None, 200,
     {"echo.tags": ["a", "b"], "echo.flag": True, "echo.color": "GREEN", "echo.n32": 7,
      "echo.when": "1970-01-01T00:00:01Z"}),
    ("GET", "/v1/typed/a/maybe/GREEN/7/1970-01-01T00:00:01Z", None, 400,
     {"code": 3, "message": "type mismatch, parameter: flag, error: invalid boolean 'maybe'"}),
    ("GET", "/v1/typed/a/true/GREEN/7.5/1970-01-01T00:00:01Z", None, 400,
     {"code": 3, "message": "type mismatch, parameter: n32, error: invalid integer '7.5'"}),
    ("DELETE", "/v1/items/x", None, 200, {"echo.id": "x"}),
    ("DELETE", "/v1/items/gone", None, 404, {"error": "no such item", "success": False}),
    ("SEARCH", "/v1/custom?id=s", None, 200, {"echo.id": "s"}),
    ("POST", "/memgw.testing.v1.EchoService/Unbound", b'{"id": "u"}', 200, {"echo.id": "u"}),
    ("POST", "/monitoring/status", None, 405, {"code": 12, "message": "Method Not Allowed: use GET for /monitoring/status"}),  # noqa: E501
    ("PUT", "/v1/items/x", None, 405, {"message": "Method Not Allowed: use PATCH or DELETE for /v1/items/x"}),
    ("GET", "/nothing/here", None, 404, {"code": 5, "message": "Not Found: no route GET /nothing/here; GET /docs lists the API"}),  # noqa: E501
    ("GET", "/monitoring/status/", None, 200, {"status": "ok"}),  # upstream: trailing slash ignored
    ("GET", "/Monitoring/STATUS", None, 200, {"status": "ok"}),  # upstream: case-insensitive,
    ("GET", "/v1/echo/%zz", None, 400, {"code": 3}),
    ("GET", "/v1/echo/%FF", None, 400, {"code": 3}),
    ("GET", "/", None, 200, {"service": "memphis-gateway"}),
    ("GET", "/metrics", None, 403, {"code": 7, "message": "metrics are private"}),
    ("GET", "/crash", None, 500, {"code": 13, "message": "internal error"}),
    ("POST", "/", None, 405, {"code": 12, "message": "Method Not Allowed: use GET for /"}),
]  # fmt: skip


def _lookup(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc[part]
    return doc


@pytest.mark.parametrize(("method", "path", "body", "status", "check"), ROUTES)
async def test_routes(server: Server, method: str, path: str, body: bytes | None, status: int, check: Any) -> None:
    got_status, headers, data = await server.call(method, path, body, AUTH)
    assert got_status == status, data
    if method == "HEAD":
        assert data == b""
        return
    doc = js(data)
    if isinstance(check, dict) and any("." in k for k in check):
        for key, value in check.items():
            assert _lookup(doc, key) == value, key
    elif isinstance(check, dict):
        assert {k: doc[k] for k in check} == check
    else:
        assert doc == check
    if status == 405:
        assert headers["Allow"]


async def test_405_lists_the_allowed_methods(server: Server) -> None:
    status, headers, _ = await server.call("PUT", "/v1/items/x", None, AUTH)
    assert status == 405 and headers["Allow"] == "PATCH, DELETE"


async def test_extra_route_with_multi_segment_capture(server: Server) -> None:
    status, headers, body = await server.call("GET", "/static/css/site.css")
    assert (status, body) == (200, b"css/site.css")
    assert headers["Access-Control-Allow-Origin"] == "*"


async def test_http_body_response_is_raw(server: Server) -> None:
    status, headers, body = await server.call("GET", "/v1/download/r1", None, AUTH)
    assert status == 200 and body == b"id\nr1\n" and headers["Content-Type"] == "text/csv"


# ---------------------------------------------------------------- bodies


async def test_http_body_request_keeps_bytes_and_content_type(server: Server) -> None:
    payload = bytes(range(256))
    status, _, body = await server.call(
        "POST", "/stations/Orders/produce/single", payload, {**AUTH, "Content-Type": "text/plain; charset=latin-1"}
    )
    assert (status, body) == (200, b'{"error":null,"success":true}')
    request, _ = server.calls.last("ProduceSingle")
    assert request.station == "Orders"
    assert request.body.data == payload and request.body.content_type == "text/plain; charset=latin-1"
    assert server.calls.last("ProduceSingle")[1].request_bytes == len(payload)


async def test_repeated_paths_keep_their_own_captures(server: Server) -> None:
    """Route matches are cached per (method, raw path): each path still gets its own captures."""
    seen = []
    for station in ["a1", "b%2D2", "a1", "c3", "b%2D2", "a1"]:
        status, _, _ = await server.call("POST", f"/stations/{station}/produce/single", b"{}",
                                         {**AUTH, "Content-Type": "application/json"})
        assert status == 200
        seen.append(server.calls.last("ProduceSingle")[0].station)
    assert seen == ["a1", "b-2", "a1", "c3", "b-2", "a1"]
    status, _, _ = await server.call("GET", "/stations/a1/produce/single", None, AUTH)
    assert status == 405  # the cached POST match is not a GET match


async def test_http_body_request_is_never_json_decoded(server: Server) -> None:
    status, _, _ = await server.call("POST", "/stations/s/produce/batch", b"[not json", {**AUTH, "Content-Type": "x/y"})
    assert status == 200
    request, _ = server.calls.last("ProduceBatch")
    assert request.body.data == b"[not json" and request.body.content_type == "x/y"


async def test_upload_of_a_whole_http_body_message(server: Server) -> None:
    status, _, body = await server.call("POST", "/v1/upload", b"\x89PNG", {**AUTH, "Content-Type": "image/png"})
    assert status == 200
    assert js(body)["raw"] == {
        "content_type": "image/png",
        "data": base64.b64encode(b"\x89PNG").decode(),
        "extensions": [],
    }


async def test_response_body_is_a_bare_array(server: Server) -> None:
    status, headers, body = await server.call("POST", "/stations/s/consume/batch", b'{"consumer_name": "c"}', AUTH)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert js(body) == [{"message": '{"message": "x"}', "headers": {"Content-Type": "application/json"}}]


async def test_path_wins_over_body(server: Server) -> None:
    await server.call("POST", "/stations/from-path/consume/batch", b'{"consumer_name": "c", "station": "b"}', AUTH)
    request, _ = server.calls.last("ConsumeBatch")
    assert request.station == "from-path"


async def test_empty_body_is_the_empty_message(server: Server) -> None:
    status, _, body = await server.call("POST", "/stations/s/consume/batch", b"", AUTH)
    assert (status, js(body)) == (400, {"error": "Consumer name is required", "success": False})


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/stations/s/consume/batch", b"not json", 400, {"error": "Invalid request body", "success": False}),
        ("/stations/s/consume/batch", b'{"consumer_name": "c",', 400,
         {"error": "Invalid request body", "success": False}),
        ("/stations/s/consume/batch", b"[]", 400,
         {"error": "Invalid request body: expected a JSON object, got an array", "success": False}),
        ("/stations/s/consume/batch", b'{"consumer_name": "c", "batch_size": "10"}', 400,
         {"error": "batch_size: expected a number, got a string", "success": False}),
        ("/auth/authenticate", b"{{", 400, {"message": "Invalid request body"}),
        ("/auth/authenticate", b'{"username": "u", "password": "secret", "account_id": "1"}', 400,
         {"message": "account_id: expected a number, got a string"}),
        ("/auth/authenticate", b'{"username": "u", "password": "secret", "account_id": 1.5}', 400,
         {"message": "account_id: expected an integer, got 1.5"}),
        ("/auth/authenticate", b'{"username": ["u"]}', 400, {"message": "username: expected a string, got an array"}),
        ("/v1/echo:search", b'{"name": 1}', 400, {"code": 3, "message": "inner.name: expected a string, got a number"}),
        ("/produce/stream", b'{"station": "s"}\nnope\n', 400, {"error": "Invalid request body", "success": False}),
    ],
)  # fmt: skip
async def test_client_mistakes_are_400_in_the_method_shape(
    server: Server, path: str, body: bytes, status: int, expected: Any
) -> None:
    got, headers, data = await server.call("POST", path, body, {**AUTH, "Content-Type": "application/json"})
    assert (got, js(data)) == (status, expected)
    assert headers["Content-Type"] == "application/json"


# ---------------------------------------------------------------- query parameters


async def test_query_parameters(server: Server) -> None:
    query = (
        "n32=5&tags=a&tags=b&inner.name=x&inner.big=9007199254740993&color=RED&labels[k]=v&maybe=m"
        "&blob=aGk&ratio=0.25&when=2024-01-01T00:00:00Z&flag=t&authorization=sneaky&unknown=1&inner.unknown=2"
    )
    status, _, body = await server.call("GET", f"/v1/echo/abc?{query}", None, AUTH)
    assert status == 200, body
    echo = js(body)["echo"]
    assert echo["id"] == "abc" and echo["n32"] == 5 and echo["tags"] == ["a", "b"]
    assert echo["inner"]["name"] == "x" and echo["inner"]["big"] == 9007199254740993
    assert echo["color"] == "RED" and echo["labels"] == {"k": "v"} and echo["maybe"] == "m"
    assert echo["blob"] == "aGk=" and echo["ratio"] == 0.25 and echo["flag"] is True
    assert echo["when"] == "2024-01-01T00:00:00Z"
    assert echo["authorization"] == ""  # ?authorization= is a credential, never a field


async def test_query_camel_case_names_and_path_fields_are_filtered(server: Server) -> None:
    status, _, body = await server.call("GET", "/v1/echo/abc?id=other&anyValue=1&byNum[3]=x", None, AUTH)
    assert status == 400  # byNum values are messages: "x" is not one
    status, _, body = await server.call("GET", "/v1/echo/abc?id=other&maybe=1", None, AUTH)
    assert status == 200 and js(body)["echo"]["id"] == "abc"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("n32=abc", "invalid query parameter 'n32': invalid integer 'abc'"),
        ("id=a&id=b", "invalid query parameter 'id': too many values"),
        ("a=x&b=1", "invalid query parameter 'b': field 'a' of the same oneof is already set"),
        ("color=PURPLE", "invalid query parameter 'color': invalid value 'PURPLE' for enum memgw.testing.v1.Color"),
        ("inners.name=x", "invalid query parameter 'inners.name': inners is not a message"),
    ],
)
async def test_query_errors(server: Server, query: str, message: str) -> None:
    status, _, body = await server.call("SEARCH", f"/v1/custom?{query}", None, AUTH)
    assert (status, js(body)) == (400, {"code": 3, "message": message})


async def test_query_with_body_fills_only_what_the_body_left_unset(server: Server) -> None:
    login = b'{"username": "u", "password": "secret"}'
    status, _, body = await server.call("POST", "/auth/authenticate?accountId=7", login)
    assert (status, js(body)["jwt"]) == (200, "jwt-7")
    login = b'{"username": "u", "password": "secret", "account_id": 3}'
    status, _, body = await server.call("POST", "/auth/authenticate?accountId=7&account_id=8", login)
    assert (status, js(body)["jwt"]) == (200, "jwt-3")
    status, _, body = await server.call("POST", "/auth/authenticate?accountId=x", b'{"password": "secret"}')
    assert status == 400 and js(body) == {"message": "invalid query parameter 'accountId': invalid integer 'x'"}


async def test_body_star_binds_no_query(server: Server) -> None:
    status, _, body = await server.call("POST", "/stations/s/consume/batch?consumer_name=c", b"{}", AUTH)
    assert (status, js(body)) == (400, {"error": "Consumer name is required", "success": False})


# ---------------------------------------------------------------- headers, metadata, auth


async def test_headers_field_filtering(server: Server) -> None:
    request = (
        b"POST /stations/s/produce/single HTTP/1.1\r\nHost: example\r\n"
        b"Authorization: Bearer good-token\r\nCookie: session=1\r\nProxy-Authorization: Basic x\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Trailer: X-T\r\nProxy-Connection: keep-alive\r\nContent-Type: application/json\r\n"
        b"X-Custom-Header: a\r\nx-custom-header: b\r\nIdempotency-Key: k1\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, headers, body = await raw_request(server, request)
    assert status == 200, body
    assert headers["X-Produced"] == "1"
    produced, ctx = server.calls.last("ProduceSingle")
    assert dict(produced.headers) == {
        "Content-Type": "application/json",
        "X-Custom-Header": "a, b",
        "Idempotency-Key": "k1",
    }
    assert ctx.protocol == "rest" and ctx.peer == "127.0.0.1"
    assert ctx.metadata["authorization"] == "Bearer good-token" and ctx.metadata["cookie"] == "session=1"
    assert ctx.metadata["x-custom-header"] == "a, b" and ctx.metadata["host"] == "example"
    assert ctx.deadline is not None


async def test_headers_field_on_a_json_body_binding(server: Server) -> None:
    status, _, body = await server.call("PATCH", "/v1/items/i1", b'{"k": "v"}', {**AUTH, "X-Mine": "1"})
    assert status == 200
    echo = js(body)["echo"]
    assert echo["labels"] == {"k": "v"} and echo["headers"]["X-Mine"] == "1" and "Authorization" not in echo["headers"]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/stations/s/produce/single", {"Authorization": f"Bearer {TOKEN}"}, 200),
        (f"/stations/s/produce/single?authorization={TOKEN}", {}, 200),
        (f"/stations/s/produce/single?authorization={TOKEN}", {"Authorization": "Bearer wrong"}, 401),
        ("/stations/s/produce/single?authorization=wrong", {}, 401),
        ("/stations/s/produce/single", {}, 401),
    ],
)
async def test_authorization_from_header_or_query(
    server: Server, path: str, headers: dict[str, str], status: int
) -> None:
    got, response_headers, body = await server.call("POST", path, b"x", headers)
    assert got == status
    if status == 401:
        doc = js(body)  # docs/rest-api.md: every 401 has {"message": "Unauthorized"}, and says why
        assert doc["message"] == "Unauthorized" and set(doc) == {"message", "reason"}
        assert response_headers["WWW-Authenticate"].startswith("Bearer realm=")
        assert doc["reason"] == "no token" or f'error_description="{doc["reason"]}"' in response_headers["WWW-Authenticate"]  # noqa: E501


async def test_grpc_timeout(server: Server) -> None:
    status, _, body = await server.call("POST", "/stations/slow/produce/single", b"x", {**AUTH, "Grpc-Timeout": "50m"})
    assert (status, js(body)) == (504, {"error": "deadline exceeded", "success": False})
    status, _, body = await server.call("POST", "/stations/s/produce/single", b"x", {**AUTH, "Grpc-Timeout": "soon"})
    assert (status, js(body)) == (400, {"error": "invalid Grpc-Timeout 'soon'", "success": False})


# ---------------------------------------------------------------- error shapes


ERRORS = [
    # ERROR_BODY_MESSAGE
    ("POST", "/auth/authenticate", b'{"username": "u", "password": "nope"}', {}, 401, {"message": "Unauthorized"}),
    ("POST", "/auth/refreshToken", b"{}", {}, 401, {"message": "Unauthorized"}),
    # ERROR_BODY_SUCCESS_FLAG
    ("POST", "/stations/schema/produce/single", b"x", AUTH, 400,
     {"error": "Schema validation has failed: missing field", "success": False}),
    ("POST", "/stations/busy/produce/single", b"x", AUTH, 429, {"error": "too many requests", "success": False}),
    # a detail replaces the shape
    ("POST", "/stations/partial/produce/batch", b"[1,2,3]", AUTH, 400,
     {"errors": ["e1", "e2"], "fail": 2, "sent": 1, "success": False}),
    # ERROR_BODY_UNSPECIFIED
    ("GET", "/monitoring/getResourcesUtilization", None, {}, 401, {"message": "Unauthorized"}),
    ("GET", "/v1/echo/gone", None, AUTH, 404, {"code": 5, "message": "no such item"}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "expected"), ERRORS)
async def test_error_shapes(
    server: Server, method: str, path: str, body: bytes | None, headers: dict[str, str], status: int, expected: Any
) -> None:
    got, response_headers, data = await server.call(method, path, body, headers)
    doc = js(data)
    if status == 401:
        assert isinstance(doc.pop("reason"), str)  # why, beside upstream's {"message": "Unauthorized"}
    assert (got, doc) == (status, expected)
    assert response_headers["Content-Type"] == "application/json"
    assert ("WWW-Authenticate" in response_headers) == (status == 401)


async def test_retry_after_is_rounded_up(server: Server) -> None:
    status, headers, _ = await server.call("POST", "/stations/busy/produce/single", b"x", AUTH)
    assert (status, headers["Retry-After"]) == (429, "2")


async def test_detail_of_an_unspecified_shape(server: Server) -> None:
    server.monitoring.down = True
    try:
        status, _, body = await server.call("GET", "/monitoring/status")
        assert (status, js(body)) == (503, {"status": "broker unreachable"})
        status, _, body = await server.call("GET", "/monitoring/getResourcesUtilization", None, AUTH)
        assert (status, js(body)) == (503, {"code": 14, "message": "no figures"})
    finally:
        server.monitoring.down = False


async def test_internal_errors_leak_nothing(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    status, _, body = await server.call("POST", "/stations/boom/produce/single", b"x", AUTH)
    assert status == 500
    doc = js(body)
    assert doc["success"] is False and doc["error"].startswith("internal error (request id ")
    assert b"secret" not in body and b"Traceback" not in body


async def test_a_mapped_error_leaves_no_reference_cycle(server: Server) -> None:
    """The Internal an unexpected error becomes must not be held by the frame its traceback holds:
    each failed call would otherwise leave its whole request graph to the cyclic collector."""
    import gc

    import gateway.rpc.call as call

    await server.call("POST", "/stations/boom/produce/single", b"x", AUTH)  # first-use allocations
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            status, _, _ = await server.call("POST", "/stations/boom/produce/single", b"x", AUTH)
            assert status == 500
        left = [o for o in gc.get_objects() if isinstance(o, call.Internal)]
    finally:
        gc.enable()
    assert left == []


# ---------------------------------------------------------------- limits


async def test_413_with_content_length(server: Server) -> None:
    status, _, body = await server.call("POST", "/stations/s/produce/single", b"x" * (LIMIT + 1), AUTH)
    assert (status, js(body)) == (413, {"error": f"request body too large (limit {LIMIT} bytes)", "success": False})
    status, _, body = await server.call("POST", "/stations/s/produce/single", b"x" * LIMIT, AUTH)
    assert status == 200


async def test_413_chunked_is_refused_before_the_end(server: Server) -> None:
    """The answer comes while the client is still sending: the body is never read whole."""
    host, _, port = server.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /auth/authenticate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
        )
        for _ in range(8):  # 8 KiB of a body that never ends
            writer.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"Connection: close" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        assert js(body) == {"message": f"request body too large (limit {LIMIT} bytes)"}
    finally:
        writer.close()


async def test_413_on_an_ndjson_line(server: Server) -> None:
    line = b'{"station": "' + b"s" * LIMIT + b'"}\n'
    status, _, body = await server.call("POST", "/produce/stream", line, AUTH)
    assert status == 413 and js(body)["success"] is False


# ---------------------------------------------------------------- CORS


async def test_cors_on_every_answer(server: Server) -> None:
    for path in ("/monitoring/status", "/nothing", "/stations/s/produce/single"):
        _, headers, _ = await server.call("GET", path, None, {"Origin": "https://app.example"})
        assert headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_preflight(server: Server) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-custom",
    }
    status, headers, body = await server.call("OPTIONS", "/stations/s/produce/single", None, preflight)
    assert (status, body) == (204, b"")
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-custom"
    status, _, body = await server.call("OPTIONS", "/nothing", None, preflight)
    assert (status, js(body)) == (404, {"code": 5, "message": "Not Found: no route OPTIONS /nothing; GET /docs lists the API"})  # noqa: E501


async def test_cors_with_listed_origins() -> None:
    calls = Calls()
    options = RestOptions(cors_origins=("https://app.example",))
    runner = rest_runner(make_app(calls, FakeMonitoring(calls), options))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            srv = Server(f"http://127.0.0.1:{runner.addresses[0][1]}", calls, FakeMonitoring(calls), session)
            _, headers, _ = await srv.call("GET", "/monitoring/status", None, {"Origin": "https://app.example"})
            assert headers["Access-Control-Allow-Origin"] == "https://app.example" and headers["Vary"] == "Origin"
            _, headers, _ = await srv.call("GET", "/monitoring/status", None, {"Origin": "https://evil.example"})
            assert "Access-Control-Allow-Origin" not in headers
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- streaming


async def test_server_stream_ndjson(server: Server) -> None:
    status, headers, body = await server.call("POST", "/stations/s/consume/stream", b'{"consumer_name": "c"}', AUTH)
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert headers["Transfer-Encoding"] == "chunked"
    lines = [js(line) for line in body.splitlines()]
    assert lines == [{"result": {"messages": [{"message": f"m{i}", "headers": {}}]}} for i in range(3)]
    request, ctx = server.calls.last("Subscribe")
    assert request.station == "s" and ctx.deadline is None  # streams get no default deadline


async def test_server_stream_error_mid_stream(server: Server) -> None:
    status, _, body = await server.call("POST", "/stations/s/consume/stream", b'{"consumer_name": "breaks"}', AUTH)
    assert status == 200
    lines = [js(line) for line in body.splitlines()]
    assert len(lines) == 4 and all("result" in line for line in lines[:3])
    assert lines[3] == {"error": {"code": 14, "message": "broker went away"}}


async def test_server_stream_error_before_the_first_message(server: Server) -> None:
    status, _, body = await server.call("POST", "/stations/s/consume/stream", b'{"consumer_name": "refused"}', AUTH)
    assert (status, js(body)) == (403, {"error": "not your station", "success": False})
    status, _, body = await server.call("GET", "/v1/watch/gone", None, AUTH)
    assert (status, js(body)) == (404, {"error": "no such watch", "success": False})
    status, _, body = await server.call("POST", "/stations/s/consume/stream", b"{}")
    assert (status, js(body)["message"]) == (401, "Unauthorized")


async def test_server_stream_lines_are_flushed_one_by_one(server: Server) -> None:
    server.calls.gate = asyncio.Event()
    try:
        async with server.session.get(server.url + "/v1/watch/gated", headers=AUTH) as resp:
            first = await asyncio.wait_for(resp.content.readline(), 5)
            assert js(first) == {"result": {"items": ["0"]}}
            server.calls.gate.set()
            rest = await resp.read()
        assert [js(line)["result"]["items"] for line in rest.splitlines()] == [["1"], ["2"]]
    finally:
        server.calls.gate = None


async def test_server_stream_stops_when_the_client_goes_away(server: Server) -> None:
    async with server.session.get(server.url + "/v1/watch/forever", headers=AUTH) as resp:
        assert js(await resp.content.readline()) == {"result": {"items": ["tick"]}}
    for _ in range(200):  # the next write fails, the generator is closed
        if any(name == "WatchClosed" for name, _, _ in server.calls.log):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the stream was never closed")


async def test_client_stream_ndjson(server: Server) -> None:
    frames = b'{"station": "a", "messages": [{"data": "aGk="}]}\n\n{"station": "b", "messages": [{}, {}]}'
    status, _, body = await server.call("POST", "/produce/stream", frames, AUTH)
    assert (status, js(body)) == (200, {"error": None, "success": True, "sent": 3})
    got, _ = server.calls.last("ProduceStream")
    assert [f.station for f in got] == ["a", "b"] and got[0].messages[0].data == b"hi"


async def test_client_stream_is_read_lazily(server: Server) -> None:
    server.calls.gate = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        yield b'{"station": "first"}\n'
        assert server.calls.gate is not None
        await asyncio.wait_for(server.calls.gate.wait(), 5)  # the servicer has the first frame already
        yield b'{"station": "second"}\n'

    try:
        status, _, _ = await server.call("POST", "/produce/stream", frames(), AUTH)  # type: ignore[arg-type]
    finally:
        server.calls.gate = None
    assert status == 200
    got, _ = server.calls.last("ProduceStream")
    assert [f.station for f in got] == ["first", "second"]


async def test_client_stream_of_the_echo_contract(server: Server) -> None:
    status, _, body = await server.call("POST", "/v1/collect", b'{"id": "1"}\n{"id": "2"}\n', AUTH)
    assert (status, js(body)["items"]) == (200, ["1", "2"])
    status, _, body = await server.call("POST", "/v1/collect", b'{"id": 1}\n', AUTH)
    assert (status, js(body)) == (400, {"code": 3, "message": "id: expected a string, got a number"})


# ---------------------------------------------------------------- property: never a 5xx


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[tuple[str, int]]:
    """The app on its own loop in a thread, for synchronous hypothesis tests; never fails on purpose."""
    calls = Calls(failures=False)
    options = RestOptions(max_body_bytes=LIMIT, extra_routes=EXTRA[:2], unbound_methods=True)
    app = make_app(calls, FakeMonitoring(calls), options)
    loop = asyncio.new_event_loop()
    runner = rest_runner(app, loop=loop)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12)
_SEGMENT = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#"), max_size=10)
_SHAPES = [
    ("POST", "/stations/{}/produce/single"), ("POST", "/stations/{}/produce/batch"),
    ("POST", "/stations/{}/consume/batch"), ("POST", "/stations/{}/consume/stream"), ("POST", "/stations/{}/ack"),
    ("POST", "/auth/authenticate"), ("POST", "/auth/refreshToken"), ("POST", "/produce/stream"),
    ("GET", "/monitoring/status"), ("GET", "/v1/echo/{}"), ("GET", "/v1/echo/{}/n/{}"), ("POST", "/v1/echo:search"),
    ("POST", "/v1/{}/{}:publish"), ("GET", "/v1/files/{}/{}"), ("GET", "/v1/typed/{}/{}/{}/{}/{}"),
    ("PATCH", "/v1/items/{}"), ("DELETE", "/v1/items/{}"), ("SEARCH", "/v1/custom"), ("GET", "/v1/watch/{}"),
    ("POST", "/v1/collect"), ("POST", "/v1/upload"), ("GET", "/v1/download/{}"), ("GET", "/static/{}"),
    ("GET", "/{}"), ("POST", "/{}/{}/{}"),
]  # fmt: skip
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "SEARCH"]


@st.composite
def _target(draw: st.DrawFn) -> tuple[str, str]:
    """A method and path, mostly shaped like a route, with random segments."""
    method, shape = draw(st.sampled_from(_SHAPES))
    if draw(st.integers(0, 4)) == 0:
        method = draw(st.sampled_from(_METHODS))
    segments = draw(st.lists(_SEGMENT, min_size=5, max_size=5))
    if draw(st.integers(0, 3)) == 0:
        segments = [draw(st.sampled_from(["topics", "a,b", "true", "RED", "7", "1970-01-01T00:00:00Z"])), *segments]
    return method, shape.format(*segments[: shape.count("{}")])


_QUERY = st.lists(
    st.tuples(st.sampled_from(["id", "n32", "tags", "a", "b", "accountId", "inner.name", "labels[k]", "byNum[1]",
                               "color", "when", "authorization", "x", "inners.name", "flag"]), _PRINTABLE),
    max_size=4,
)  # fmt: skip
_BODIES = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    st.sampled_from([b"{}", b"[]", b'{"consumer_name": "c"}', b'{"username": "u", "password": "p", "account_id": 1}',
                     b'{"id": "x"}\n{"id": 2}\n', b"null", b'{"name": {"x": 1}}', b'{"a": "x", "b": 1}']),
)  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=_target(),
    query=_QUERY,
    body=_BODIES,
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-protobuf", "", "a/b; c=d"]),
    token=st.booleans(),
)
def test_never_a_5xx(
    threaded_server: tuple[str, int],
    target: tuple[str, str],
    query: list[tuple[str, str]],
    body: bytes,
    content_type: str,
    token: bool,
) -> None:
    host, port = threaded_server
    method, path = target
    if query:
        path += "?" + "&".join(f"{k}={v.replace('&', '').replace('#', '')}" for k, v in query)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if content_type:
            conn.putheader("Content-Type", content_type)
        if token:
            conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status < 500, (method, path, body, data)
    assert b"Traceback" not in data
    if data and resp.getheader("Content-Type") == "application/json":
        orjson.loads(data)


async def test_sse_stream_format(server: Server) -> None:
    """StreamFormat SSE: text/event-stream, an id-only event for an unset response_body, then an error event."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": "1:7"}
    async with server.session.get(server.url + "/stations/s/consume/sse?consumer_name=breaks",
                                  headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream" and resp.headers["Cache-Control"] == "no-cache"
        text = (await resp.read()).decode()
    assert text == (
        "retry: 1000\n\n"
        "id: 1:0\n\n"
        'id: 1:1\ndata: {"message":"m1","headers":{},"sequence":1,"partition":1}\n\n'
        'id: 1:2\ndata: {"message":"m2","headers":{},"sequence":2,"partition":1}\n\n'
        'event: error\ndata: {"code":14,"message":"broker went away"}\n\n'
    )
    request, ctx = server.calls.last("ConsumeEvents")
    assert request.station == "s" and ctx.metadata["last-event-id"] == "1:7"
