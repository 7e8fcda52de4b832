"""Fuzzing the real gateway (real nats-server): no 5xx for a client's mistake, no traceback in any answer.

1. hypothesis on the REST transcoder: methods, paths shaped like the routes with hostile segments
   (percent-escapes, invalid UTF-8, dots, unicode), query strings, bodies (bytes, JSON, request-like
   objects with wrong types), content types and encodings, arbitrary headers (``$memphis*``,
   ``Grpc-Timeout``, latin-1 bytes), with and without a valid token.
2. schemathesis against the gateway's own OpenAPI description, fetched from ``GET /openapi.json``
   (gateway/openapi.py), positive and negative cases for every operation, checked with
   ``not_a_server_error``; positive answers are also checked against the documented status codes,
   content types and response schemas (the description must not lie).

Allowed 5xx: 504 when the request itself asked for a deadline (``Grpc-Timeout``), and the known
memphis_adapter bug (a refused connection token is 503, see
tests/test_log_secrets.py::test_refused_connection_token_is_401), counted apart. The figures are
printed (``-s``): cases run, 5xx found.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import grpc
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.transcoding.openapi import OPENAPI_PATH
from tests.harness import Clients, running_gateway, settings_for

# schemathesis imports most of itself lazily, and run_schemathesis runs in a worker thread: CPython
# 3.11 before 3.11.9 can fail compiling in two threads at once ("AST constructor recursion depth
# mismatch", gh-106905). Load it here, on the main thread, while the tests are collected.
schemathesis.openapi.from_dict(
    {"openapi": "3.1.0", "info": {"title": "warm-up", "version": "1"}, "paths": {}}
)

BODY_LIMIT = 64 * 1024
TRACEBACK_MARKERS = (b"Traceback", b'File "', b"Error(", b"line ")
STREAM_PATH_SUFFIX = "/consume/stream"
TRANSCODER_EXAMPLES = 2500
SCHEMATHESIS_EXAMPLES = 40  # per operation and generation mode
STREAM_EXAMPLES = 4  # a valid Subscribe holds until the client goes: each costs the client timeout


@contextlib.asynccontextmanager
async def gateway_with_openapi(nats_url: str, data_dir: Any, **overrides: Any) -> AsyncIterator[Clients]:
    async with running_gateway(settings_for(nats_url, data_dir, **overrides)) as clients:
        yield clients


class ErrorLog(logging.Handler):
    """ERROR records of the gateway's loggers (an unexpected exception is logged once, as ERROR)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("gateway"):
            self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
async def fz(nats_server, tmp_path_factory) -> AsyncIterator[Clients]:
    async with gateway_with_openapi(
        nats_server.url, tmp_path_factory.mktemp("gw"), max_body_bytes=BODY_LIMIT, max_consume_wait_ms=300,
        max_streams_per_user=64, broker_timeout_s=3.0, request_timeout_s=5.0,  # a loaded CI: no 503 for a slow login
        # thousands of generated logins from one address would trip the login throttle, and the same
        # case would answer 401 once and 429 the next time (hypothesis: "flaky"); it has its own tests
        login_failures_per_user_per_min=0, login_failures_per_address_per_min=0,
    ) as clients:  # fmt: skip
        yield clients


@pytest.fixture(scope="module")
async def token(fz: Clients) -> str:
    return await fz.rest_token()


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger("gateway").addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger("gateway").removeHandler(handler)


@dataclasses.dataclass
class Tally:
    """What a fuzz run saw."""

    cases: int = 0
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    server_errors: list[str] = dataclasses.field(default_factory=list)
    known: list[str] = dataclasses.field(default_factory=list)  # the adapter's refused-connection-token 503
    other_failures: list[str] = dataclasses.field(default_factory=list)
    transient: list[str] = dataclasses.field(default_factory=list)  # transport errors, each retried once
    streams_held: int = 0
    protocol_errors: int = 0  # 400 text/plain from aiohttp's HTTP parser (unknown method, bad encoding, ...)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def summary(self) -> str:
        common = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"{self.cases} cases, 5xx found: {len(self.server_errors)} (+{len(self.known)} known adapter 503), "
                f"streams held open until the client left: {self.streams_held}, refused by aiohttp's HTTP parser: "
                f"{self.protocol_errors}; transport errors retried: {len(self.transient)} {self.transient[:3]}; "
                f"statuses {{{common}}}")


def known_adapter_503(method: str, path: str, body: bytes, status: int) -> bool:
    """memphis_adapter: a connection token the broker refuses is 503 after broker_timeout_s (not 401)."""
    return status == 503 and path.startswith("/auth/authenticate") and b"connection_token" in body


# ---------------------------------------------------------------- 1. hypothesis on the transcoder

_ROUTES = [
    ("POST", "/stations/{}/produce/single"), ("POST", "/stations/{}/produce/batch"),
    ("POST", "/stations/{}/consume/batch"), ("POST", "/stations/{}/consume/stream"), ("POST", "/stations/{}/ack"),
    ("POST", "/auth/authenticate"), ("POST", "/auth/refreshToken"), ("POST", "/produce/stream"),
    ("GET", "/monitoring/status"), ("GET", "/monitoring/getResourcesUtilization"), ("GET", "/openapi.json"),
    ("GET", "/stations/{}/{}"), ("POST", "/{}"), ("GET", "/"),
]  # fmt: skip
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "FOO"]
_SEGMENTS = st.one_of(
    st.sampled_from(["st", "ST.x", "a.b", ".", "..", "%2E%2E", "a%2Fb", "%FF", "%C3%A9", "%", "%zz", "%00", "x" * 300,
                     "-bad", "a$b", "%F0%9F%92%A5", "name%20with%20space", "ok_1", "a;b", "a,b", "", "a%0Ab",
                     "%0D%0A", "%09"]),
    st.text(min_size=0, max_size=20).map(lambda s: quote(s, safe="")),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#"), max_size=12),
)  # fmt: skip
_QUERY_KEYS = st.sampled_from(["accountId", "account_id", "authorization", "batch_size", "idempotencyKey",
                               "partitionKey", "consumer_name", "tokenExpiryInMinutes", "x", "a[b]", "", "%FF"])
_QUERY_VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0", "99999999999999999999", "1.5", "true", "%FF", "%", "a%00b", "", "NaN"]),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_FIELDS = ["username", "password", "connection_token", "account_id", "token_expiry_in_minutes",
           "refresh_token_expiry_in_minutes", "jwt_refresh_token", "consumer_name", "consumer_group", "batch_size",
           "batch_max_wait_time_ms", "ack_mode", "ack_ids", "nack", "station", "messages", "accountId", "batchSize"]
_BODIES = st.one_of(
    st.binary(max_size=200),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.lists(st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=3), max_size=3).map(
        lambda frames: b"\n".join(json.dumps(f).encode() for f in frames)),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"consumer_name": "c", "batch_max_wait_time_ms": 100}',
                     b'{"username": "root", "password": "nope"}', b'{"ack_ids": ["1.2.3", "x"]}',
                     b'{"station": "s", "messages": [{"data": "aGk="}]}\n{"station": "-bad"}', b"[1, [2], {}]",
                     b'{"batch_size": 1e400}', b'"\\ud800"', b'{"a": "\\u0000"}', b"\xff\xfe{}", b"[" * 5000,
                     b'{"consumer_name": "c", "ack_mode": "ACK_MODE_NOPE"}']),
)  # fmt: skip
_CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "text/plain", "text/plain; charset=latin-1",
    "application/x-protobuf", "application/x-ndjson", "application/octet-stream", "", "a/b; c=d", "text/",
    "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ";;;", "text/*",
])  # fmt: skip
_HEADER_NAMES = st.sampled_from([
    "X-Custom", "$memphis_x", "$MEMPHIS", "Grpc-Timeout", "Content-Encoding", "X-HTTP-Method-Override", "Accept",
    "Idempotency-Key", "Partition-Key", "msg-id", "Connection", "TE", "Origin", "Expect", "Grpc-Metadata-Foo",
    "X-Empty", "Cookie", "Range", "If-None-Match",
])  # fmt: skip
_HEADER_VALUES = st.one_of(
    st.sampled_from(["1S", "0n", "99999999H", "abc", "gzip", "deflate", "br", "GET", "close", "trailers",
                     "100-continue", "", "x" * 2000, "a, b", "*/*"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=20),
)  # fmt: skip


@st.composite
def _requests(draw: st.DrawFn) -> dict[str, Any]:
    method, shape = draw(st.sampled_from(_ROUTES))
    if draw(st.integers(0, 5)) == 0:
        method = draw(st.sampled_from(_METHODS))
    path = shape.format(*draw(st.lists(_SEGMENTS, min_size=2, max_size=2)))
    query = draw(st.lists(st.tuples(_QUERY_KEYS, _QUERY_VALUES), max_size=3))
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query)
    return {
        "method": method,
        "path": path,
        "body": draw(_BODIES),
        "content_type": draw(_CONTENT_TYPES),
        "headers": draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=3)),
        "token": draw(st.sampled_from(["valid", "valid", "none", "garbage"])),
    }


def send(host: str, port: int, req: dict[str, Any], token: str) -> tuple[int, bytes, dict[str, str]] | None:
    """One request over http.client; None when a stream stayed open until the client gave up."""
    conn = http.client.HTTPConnection(host, port, timeout=1.5 if STREAM_PATH_SUFFIX in req["path"] else 10)
    try:
        conn.putrequest(req["method"], req["path"], skip_accept_encoding=True)
        if req["content_type"]:
            conn.putheader("Content-Type", req["content_type"])
        if req["token"] != "none":
            conn.putheader("Authorization", f"Bearer {token if req['token'] == 'valid' else 'garbage'}")
        for name, value in req["headers"]:
            conn.putheader(name, value.encode("latin-1"))
        conn.putheader("Content-Length", str(len(req["body"])))
        conn.endheaders(req["body"])
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    except TimeoutError:
        if STREAM_PATH_SUFFIX in req["path"]:
            return None
        raise
    finally:
        conn.close()


def check_answer(tally: Tally, where: str, status: int, body: bytes, headers: dict[str, str], *,
                 asked_deadline: bool, known: bool) -> None:
    with tally.lock:
        tally.cases += 1
        tally.statuses[status] += 1
        if status >= 500 and not (status == 504 and asked_deadline):
            (tally.known if known else tally.server_errors).append(f"{status} {where}: {body[:200]!r}")
        if any(marker in body for marker in TRACEBACK_MARKERS[:2]):
            tally.other_failures.append(f"traceback in {where}: {body[:300]!r}")
        ctype = headers.get("content-type", "")
        if status == 400 and ctype.startswith("text/plain"):  # aiohttp's HTTP parser refused the request
            tally.protocol_errors += 1
        elif status >= 400 and body and not ctype.startswith("application/json"):
            tally.other_failures.append(f"an error that is not JSON, {status} {where}: {body[:100]!r}")
        if body and headers.get("content-type", "").startswith("application/json"):
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                tally.other_failures.append(f"JSON answer that does not parse, {where}: {body[:200]!r}")


def run_transcoder_fuzz(base: str, token: str, tally: Tally) -> None:
    url = urlsplit(base)

    @settings(max_examples=TRANSCODER_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=_requests())
    @example(req={"method": "POST", "path": "/stations/fuzz-empty/consume/stream", "token": "valid", "headers": [],
                  "body": b'{"consumer_name": "c"}', "content_type": "application/json"})  # held until we leave
    @example(req={"method": "POST", "path": "/stations/fuzz-st/produce/single?partitionKey=p", "token": "valid",
                  "headers": [("X-Custom", "v")], "body": b"{}", "content_type": "application/json"})
    def one(req: dict[str, Any]) -> None:
        answer = send(url.hostname or "", url.port or 0, req, token)
        where = f"{req['method']} {req['path']} ({req['content_type']!r}, {req['headers']!r}, {req['body'][:80]!r})"
        if answer is None:
            with tally.lock:
                tally.cases += 1
                tally.streams_held += 1
            return
        status, body, headers = answer
        asked = any(name == "Grpc-Timeout" for name, _ in req["headers"])
        check_answer(tally, where, status, body, headers, asked_deadline=asked,
                     known=known_adapter_503(req["method"], req["path"], req["body"], status))

    one()


async def test_transcoder_fuzz_no_5xx_no_traceback(fz: Clients, token: str, error_log: ErrorLog) -> None:
    tally = Tally()
    started = time.monotonic()
    await asyncio.to_thread(run_transcoder_fuzz, fz.base, token, tally)
    elapsed = time.monotonic() - started
    print(f"\nFIGURES transcoder fuzz (hypothesis, real broker): {tally.summary()} in {elapsed:.1f} s; "
          f"gateway ERROR log records: {len(error_log.records)}")
    for line in sorted({f[:160] for f in tally.other_failures})[:12]:
        print("  failure:", line)
    assert tally.cases >= TRANSCODER_EXAMPLES * 0.9
    assert not tally.server_errors, tally.server_errors[:10]
    assert not tally.other_failures, tally.other_failures[:10]
    assert not error_log.records, error_log.records[:10]
    assert (await fz.get("/monitoring/status"))[0] == 200  # and the gateway is still well


# ---------------------------------------------------------------- 2. schemathesis on /openapi.json


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    frames = value if isinstance(value, list) else [value]
    return b"\n".join(json.dumps(f, default=str).encode() for f in frames) + b"\n"


@schemathesis.serializer("application/x-protobuf", "text/*")
def _raw(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else json.dumps(value, default=str).encode()


CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


def _is_timeout(exc: BaseException | None) -> bool:
    """A client-side read timeout, however schemathesis wrapped it."""
    while exc is not None:
        if isinstance(exc, requests.exceptions.Timeout | TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _schemathesis_test(strategy: Any, mode: Any, streaming: bool, base: str, auth: dict[str, str], tally: Tally,
                       mismatches: list[str]) -> Any:
    """One hypothesis test of one operation and generation mode: calls, checks, records (never raises)."""

    @settings(max_examples=STREAM_EXAMPLES if streaming else SCHEMATHESIS_EXAMPLES, deadline=None,
              database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case: Any) -> None:
        try:
            response = case.call(base_url=base, headers=auth, timeout=1.5 if streaming else 10)
        except Exception as exc:
            if streaming and _is_timeout(exc):
                with tally.lock:
                    tally.cases += 1
                    tally.streams_held += 1
                return
            # A transport error (reset, timeout) on a busy machine: printed as a figure and the case
            # sent once more; a second failure fails the test with the real error, not as "flaky".
            with tally.lock:
                tally.transient.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}"[:200])
            response = case.call(base_url=base, headers=auth, timeout=10)
        where = f"{mode.value} {case.method} {case.formatted_path} query={case.query!r}"
        sent = response.request.body or b""
        sent = sent.encode() if isinstance(sent, str) else sent
        check_answer(tally, where, response.status_code, response.content,
                     {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()},
                     asked_deadline=False,
                     known=known_adapter_503(case.method, case.formatted_path, sent,
                                             response.status_code))
        checks = [not_a_server_error, *(CONFORMANCE if mode is schemathesis.GenerationMode.POSITIVE
                                        else [])]
        try:
            case.validate_response(response, checks=checks)
        except (AssertionError, FailureGroup) as exc:  # a failed check: recorded, the run goes on
            text = str(exc).splitlines()
            if response.status_code < 500:
                mismatches.append(f"{where} -> {response.status_code}: {' | '.join(text[:4])[:300]}")


    return one


def run_schemathesis(doc: dict[str, Any], base: str, token: str, tally: Tally,
                     mismatches: list[str]) -> list[str]:
    schema = schemathesis.openapi.from_dict(doc)
    labels = []
    auth = {"Authorization": f"Bearer {token}"}
    for result in schema.get_all_operations():
        op = result.ok()
        labels.append(op.label)
        streaming = op.path.endswith(STREAM_PATH_SUFFIX)
        positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
        runs: list[tuple[Any, dict[str, str] | None]] = [(positive, None), (negative, None)]
        if "{station}" in op.path:  # and valid station names, so that cases reach the broker too
            runs.append((positive, {"station": "fuzz-station"}))
        for mode, path_parameters in runs:
            strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)
            one = _schemathesis_test(strategy, mode, streaming, base, auth, tally, mismatches)
            try:
                one()
            except Unsatisfiable:  # nothing to make invalid: no parameters, no body
                if mode is not negative:
                    raise
            except Exception as exc:  # schemathesis could not build a case at all
                with tally.lock:
                    if type(exc).__name__ == "FlakyFailure" and op.path == "/auth/authenticate":
                        # a login's answer depends on the real broker's timing (401, or 503 when a loaded
                        # machine misses the broker deadline): the same case may answer differently;
                        # every answer was still checked above (no 5xx but 503, no traceback)
                        tally.transient.append(f"{op.label} {mode.value}: flaky login answer")
                    else:
                        tally.other_failures.append(f"{op.label} {mode.value}: {type(exc).__name__}: {exc}"[:300])
    return labels


@pytest.mark.timeout(240)  # ~2,700 cases over 32 operations: about a minute on a quiet machine
async def test_schemathesis_against_openapi_json(fz: Clients, token: str, error_log: ErrorLog) -> None:
    async with aiohttp.ClientSession() as http, http.get(fz.base + OPENAPI_PATH) as resp:
        assert resp.status == 200
        doc = await resp.json()
    bound = {op["x-grpc-method"] for item in doc["paths"].values() for op in item.values() if "x-grpc-method" in op}
    assert bound == {e.full_name for e in fz.gateway.endpoints}  # every RPC of the running gateway is described
    tally = Tally()
    mismatches: list[str] = []
    started = time.monotonic()
    labels = await asyncio.to_thread(run_schemathesis, doc, fz.base, token, tally, mismatches)
    elapsed = time.monotonic() - started
    print(f"\nFIGURES schemathesis on /openapi.json: {len(labels)} operations, {tally.summary()} in {elapsed:.1f} s; "
          f"documentation mismatches: {len(mismatches)}; gateway ERROR log records: {len(error_log.records)}")
    for line in mismatches[:10]:
        print("  mismatch:", line)
    for line in tally.known[:2]:
        print("  known:", line)
    assert len(labels) == len(bound) + 1  # + GET /openapi.json
    assert not tally.server_errors, tally.server_errors[:10]
    assert not tally.other_failures, tally.other_failures[:10]
    assert not mismatches, mismatches[:10]
    assert not error_log.records, error_log.records[:10]


async def test_grpc_still_serves_after_the_fuzz(fz: Clients, token: str) -> None:
    from memgw.v1 import monitoring_pb2

    reply = await fz.monitoring.GetResourcesUtilization(monitoring_pb2.GetResourcesUtilizationRequest(),
                                                        metadata=(("authorization", f"Bearer {token}"),))
    assert reply.storage >= 0
    with pytest.raises(grpc.aio.AioRpcError):
        await fz.monitoring.GetResourcesUtilization(monitoring_pb2.GetResourcesUtilizationRequest())
