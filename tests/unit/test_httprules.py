"""google.api.http rules -> bindings (gateway.transcoding.bindings), on a test contract compiled here.

``ECHO`` (compiled once by protoc into the default descriptor pool) is the test contract that
test_jsoncodec.py and test_rest_transcoder.py share: an echo service covering verbs, ``**``,
nested path fields, additional bindings, ``HttpBody`` both ways, streaming, and one service per
invalid rule.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from memgw.v1 import options_pb2

from gateway.core.errors import InvalidArgument
from gateway.rpc.call import CallContext, Endpoint, build_endpoints
from gateway.rpc.contract import SERVICES
from gateway.transcoding.bindings import Binding, HttpRuleError, build_bindings
from gateway.transcoding.convert import parse_text

ROOT = Path(__file__).resolve().parents[2]

ECHO_PROTO = r"""
syntax = "proto3";
package memgw.testing.v1;

import "google/api/annotations.proto";
import "google/api/httpbody.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
import "memgw/v1/options.proto";

enum Color { COLOR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }

message Inner {
  string name = 1;
  int64 big = 2;
  repeated string tags = 3;
  Color color = 4;
}

message EchoRequest {
  string id = 1;
  int32 n32 = 2;
  uint64 u64 = 3;
  bool flag = 4;
  double ratio = 5;
  Color color = 6;
  Inner inner = 7;
  repeated string tags = 8;
  map<string, string> labels = 9;
  bytes blob = 10;
  google.protobuf.Timestamp when = 11;
  oneof choice { string a = 12; int32 b = 13; }
  repeated int32 nums = 14;
  optional string maybe = 15;
  map<int32, Inner> by_num = 16;
  google.protobuf.Struct extra = 17;
  google.protobuf.Int64Value wrapped = 18;
  bytes text = 19 [(memgw.v1.json_text) = true];
  repeated Inner inners = 20;
  float f32 = 21;
  sint32 s32 = 22;
  google.protobuf.Duration span = 23;
  map<bool, string> flags = 24;
  google.protobuf.Value any_value = 25;
  google.protobuf.NullValue nothing = 26;
  map<string, string> headers = 27;
  string authorization = 28;
}

message EchoResponse {
  EchoRequest echo = 1;
  repeated string items = 2;
  google.api.HttpBody raw = 3;
}

service EchoService {
  rpc Get(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = {
      get: "/v1/echo/{id}"
      additional_bindings { get: "/v1/echo/{id}/n/{n32}" }
      additional_bindings { post: "/v1/echo:search" body: "inner" }
    };
  }
  rpc Publish(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { post: "/v1/{inner.name=topics/*}:publish" body: "*" };
  }
  rpc Files(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { get: "/v1/files/{id=**}" response_body: "items" };
  }
  rpc Download(EchoRequest) returns (google.api.HttpBody) {
    option (google.api.http) = { get: "/v1/download/{id}" };
  }
  rpc Upload(google.api.HttpBody) returns (EchoResponse) {
    option (google.api.http) = { post: "/v1/upload" body: "*" };
  }
  rpc Typed(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { get: "/v1/typed/{tags}/{flag}/{color}/{n32}/{when}" };
  }
  rpc Update(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { patch: "/v1/items/{id}" body: "labels" };
    option (memgw.v1.transcoding) = { headers_field: "headers" error_body: ERROR_BODY_MESSAGE };
  }
  rpc Remove(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { delete: "/v1/items/{id}" };
    option (memgw.v1.transcoding) = { error_body: ERROR_BODY_SUCCESS_FLAG };
  }
  rpc Custom(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { custom { kind: "SEARCH" path: "/v1/custom" } };
  }
  rpc Watch(EchoRequest) returns (stream EchoResponse) {
    option (google.api.http) = { get: "/v1/watch/{id}" };
    option (memgw.v1.transcoding) = { error_body: ERROR_BODY_SUCCESS_FLAG };
  }
  rpc Collect(stream EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { post: "/v1/collect" body: "*" };
  }
  rpc Unbound(EchoRequest) returns (EchoResponse);
}

service BadGetBody { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x" body: "*" }; } }
service BadDeleteBody { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { delete: "/x" body: "*" }; } }
service BadNested { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { post: "/x" additional_bindings { get: "/y" additional_bindings { get: "/z" } } }; } }
service BadClientStreamPath { rpc M(stream EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { post: "/x/{id}" body: "*" }; } }
service BadBodyField { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { post: "/x" body: "nope" }; } }
service BadResponseBody { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x" response_body: "nope" }; } }
service BadTemplate { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x/{id" }; } }
service BadPathField { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x/{nope}" }; } }
service BadPathMessage { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x/{inner}" }; } }
service BadPathThroughRepeated { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x/{inners.name}" }; } }
service BadPathMap { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { get: "/x/{labels}" }; } }
service BadPathInBody { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { post: "/x/{inner.name}" body: "inner" }; } }
service BadHeadersField { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { post: "/x" body: "*" };
  option (memgw.v1.transcoding) = { headers_field: "id" }; } }
service BadHeadersFieldType { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { post: "/x" body: "*" };
  option (memgw.v1.transcoding) = { headers_field: "by_num" }; } }
service BadDuplicate {
  rpc A(EchoRequest) returns (EchoResponse) { option (google.api.http) = { get: "/dup/{id}" }; }
  rpc B(EchoRequest) returns (EchoResponse) { option (google.api.http) = { get: "/dup/{id}" }; }
}
service BadNoPattern { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { additional_bindings { get: "/y" } }; } }
service BadCustomKind { rpc M(EchoRequest) returns (EchoResponse) {
  option (google.api.http) = { custom { kind: "no way" path: "/x" } }; } }
"""


@functools.cache
def echo_file() -> Any:
    """Compile ECHO_PROTO with protoc and add it to the default pool (once per process)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName("memgw/testing/v1/echo.proto")
    except KeyError:
        pass
    from google.api import annotations_pb2, httpbody_pb2  # noqa: F401 (dependencies into the pool)
    from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2, wrappers_pb2  # noqa: F401
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "memgw" / "testing" / "v1" / "echo.proto"
        src.parent.mkdir(parents=True)
        src.write_text(ECHO_PROTO)
        out = Path(tmp) / "echo.pb"
        args = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"-I{ROOT / 'protos'}", f"-I{include}",
            f"--descriptor_set_out={out}", "memgw/testing/v1/echo.proto",
        ]  # fmt: skip
        subprocess.run(args, check=True, capture_output=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool.AddSerializedFile(files.file[0].SerializeToString())
    return pool.FindFileByName("memgw/testing/v1/echo.proto")


def service(name: str) -> ServiceDescriptor:
    return echo_file().services_by_name[name]  # type: ignore[no-any-return]


def message_class(name: str) -> Any:
    echo_file()
    return GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(f"memgw.testing.v1.{name}"))


class AdmitAll:
    """A Guard that admits every call."""
    meters_bytes = False

    def charge(self, ctx: CallContext, nbytes: int) -> None:
        return None


    def admit(self, endpoint: Endpoint, ctx: CallContext) -> None:
        return None

    def authorize(self, endpoint: Endpoint, ctx: CallContext, request: Any) -> None:
        return None

    def release(self, endpoint: Endpoint, ctx: CallContext) -> None:
        return None


class AnyMethod:
    """A servicer of ``service`` whose every method answers an empty response."""

    def __init__(self, service_name: str) -> None:
        self.SERVICE = service_name

    def __getattr__(self, name: str) -> Any:
        async def method(request: Any, ctx: CallContext) -> Any:
            return message_class("EchoResponse")()

        return method


def endpoints_of(svc: ServiceDescriptor) -> list[Endpoint]:
    return build_endpoints([svc], [AnyMethod(svc.full_name)], AdmitAll())


def by_name(bindings: list[Binding]) -> dict[str, Binding]:
    return {b.name.rpartition(".")[2]: b for b in bindings}


# ---------------------------------------------------------------- the contract


def test_contract_bindings() -> None:
    services = [AnyMethod(s.full_name) for s in SERVICES]
    bindings = by_name(build_bindings(build_endpoints(SERVICES, services, AdmitAll())))
    single = bindings["ProduceSingle_0"]
    assert (single.http_method, single.template.source, single.body) == (
        "POST",
        "/stations/{station}/produce/single",
        "body",
    )
    assert single.raw_body and single.headers_field == "headers"
    assert single.error_body == options_pb2.ERROR_BODY_SUCCESS_FLAG
    assert single.simple_path == ("station",)
    consume = bindings["ConsumeBatch_0"]
    assert consume.response_body == "messages" and not consume.raw_body
    assert consume.query is None  # body "*" without query_with_body
    auth = bindings["Authenticate_0"]
    assert auth.error_body == options_pb2.ERROR_BODY_MESSAGE and auth.query is not None and auth.query.only_unset
    assert bindings["Status_0"].http_method == "GET"
    assert bindings["ProduceStream_0"].query is None


def test_echo_bindings_in_declaration_order() -> None:
    bindings = build_bindings(endpoints_of(service("EchoService")))
    assert [(b.name.rpartition(".")[2], b.http_method, b.template.source) for b in bindings] == [
        ("Get_0", "GET", "/v1/echo/{id}"),
        ("Get_1", "GET", "/v1/echo/{id}/n/{n32}"),
        ("Get_2", "POST", "/v1/echo:search"),
        ("Publish_0", "POST", "/v1/{inner.name=topics/*}:publish"),
        ("Files_0", "GET", "/v1/files/{id=**}"),
        ("Download_0", "GET", "/v1/download/{id}"),
        ("Upload_0", "POST", "/v1/upload"),
        ("Typed_0", "GET", "/v1/typed/{tags}/{flag}/{color}/{n32}/{when}"),
        ("Update_0", "PATCH", "/v1/items/{id}"),
        ("Remove_0", "DELETE", "/v1/items/{id}"),
        ("Custom_0", "SEARCH", "/v1/custom"),
        ("Watch_0", "GET", "/v1/watch/{id}"),
        ("Collect_0", "POST", "/v1/collect"),
    ]
    b = by_name(bindings)
    assert b["Download_0"].raw_response and b["Upload_0"].raw_body
    assert b["Get_2"].body == "inner" and b["Get_2"].query is not None
    assert b["Files_0"].response_body == "items"
    assert b["Publish_0"].simple_path == ()  # a nested field goes through set_text


def test_unbound_methods() -> None:
    bindings = by_name(build_bindings(endpoints_of(service("EchoService")), unbound_methods=True))
    unbound = bindings["Unbound_0"]
    assert (unbound.http_method, unbound.template.source, unbound.body) == (
        "POST",
        "/memgw.testing.v1.EchoService/Unbound",
        "*",
    )


BAD = [
    ("BadGetBody", "GET may not have a body"),
    ("BadDeleteBody", "DELETE may not have a body"),
    ("BadNested", "additional_bindings may not be nested"),
    ("BadClientStreamPath", "cannot use path parameter in client streaming"),
    ("BadBodyField", "body field 'nope' is not a field of memgw.testing.v1.EchoRequest"),
    ("BadResponseBody", "response_body 'nope' is not a field"),
    ("BadTemplate", "invalid path template '/x/{id'"),
    ("BadPathField", "path parameter 'nope' is not a field"),
    ("BadPathMessage", "path parameter 'inner' must be a scalar field"),
    ("BadPathThroughRepeated", "path parameter 'inners.name': inners is not a message"),
    ("BadPathMap", "path parameter 'labels' must be a scalar field"),
    ("BadPathInBody", "path parameter 'inner.name' is inside the body field 'inner'"),
    ("BadHeadersField", "headers_field 'id' must be a map<string, string> field"),
    ("BadHeadersFieldType", "headers_field 'by_num' must be a map<string, string> field"),
    ("BadDuplicate", "GET /dup/{id} is already bound by memgw.testing.v1.BadDuplicate.A_0"),
    ("BadNoPattern", "has additional_bindings but no pattern"),
    ("BadCustomKind", "invalid custom method 'no way'"),
]


@pytest.mark.parametrize(("name", "message"), BAD)
def test_invalid_rules_fail_at_start_up(name: str, message: str) -> None:
    with pytest.raises(HttpRuleError) as info:
        build_bindings(endpoints_of(service(name)))
    assert message in str(info.value)
    assert f"memgw.testing.v1.{name}." in str(info.value)


def test_delete_body_allowed_when_asked() -> None:
    (binding,) = build_bindings(endpoints_of(service("BadDeleteBody")), allow_delete_body=True)
    assert binding.http_method == "DELETE" and binding.body == "*"


# ---------------------------------------------------------------- text values


def _field(name: str) -> Any:
    return message_class("EchoRequest").DESCRIPTOR.fields_by_name[name]


TEXT_OK = [
    ("id", "abc", "abc"),
    ("n32", "-12", -12),
    ("n32", "+7", 7),
    ("u64", "18446744073709551615", 2**64 - 1),
    ("flag", "true", True),
    ("flag", "1", True),
    ("flag", "F", False),
    ("ratio", "1.5", 1.5),
    ("ratio", "-2e3", -2000.0),
    ("color", "GREEN", 2),
    ("color", "1", 1),
    ("blob", "aGk=", b"hi"),
    ("blob", "aGk", b"hi"),
    ("blob", "_-8", b"\xff\xef"),
    ("s32", "-5", -5),
]


@pytest.mark.parametrize(("field", "text", "value"), TEXT_OK)
def test_parse_text(field: str, text: str, value: object) -> None:
    assert parse_text(_field(field), text) == value


TEXT_BAD = [
    ("n32", "1.5"),
    ("n32", "abc"),
    ("n32", " 1"),
    ("n32", "1_000"),
    ("n32", "2147483648"),
    ("u64", "-1"),
    ("flag", "yes"),
    ("ratio", "one"),
    ("ratio", "1_0"),
    ("color", "PURPLE"),
    ("blob", "!!"),
    ("inner", "x"),
    ("when", "yesterday"),
]


@pytest.mark.parametrize(("field", "text"), TEXT_BAD)
def test_parse_text_rejects(field: str, text: str) -> None:
    with pytest.raises(ValueError):
        parse_text(_field(field), text)


def test_parse_text_well_known_types() -> None:
    when = parse_text(_field("when"), "2024-01-02T03:04:05Z")
    assert when.seconds == 1704164645
    assert parse_text(_field("span"), "1.5s").nanos == 500_000_000
    assert parse_text(_field("wrapped"), "42").value == 42
    assert parse_text(_field("extra"), '{"a": 1}')["a"] == 1


# ---------------------------------------------------------------- building messages


def _binding(method: str) -> Binding:
    return by_name(build_bindings(endpoints_of(service("EchoService"))))[method]


def test_build_path_params_by_type() -> None:
    msg = _binding("Typed_0").build(
        b"", "", {"tags": "a,b", "flag": "true", "color": "RED", "n32": "7", "when": "1970-01-01T00:00:09Z"}
    )
    assert list(msg.tags) == ["a", "b"] and msg.flag and msg.color == 1 and msg.n32 == 7
    assert msg.when.seconds == 9


@pytest.mark.parametrize(
    ("captured", "message"),
    [
        ({"tags": "a", "flag": "maybe", "color": "RED", "n32": "1", "when": "1970-01-01T00:00:00Z"}, "flag"),
        ({"tags": "a", "flag": "true", "color": "BLUE", "n32": "1", "when": "1970-01-01T00:00:00Z"}, "color"),
        ({"tags": "a", "flag": "true", "color": "RED", "n32": "x", "when": "1970-01-01T00:00:00Z"}, "n32"),
    ],
)
def test_build_path_type_mismatch(captured: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _binding("Typed_0").build(b"", "", captured)
    assert info.value.message.startswith(f"type mismatch, parameter: {message}, error: ")


def test_build_nested_path_param_wins_over_body() -> None:
    body = b'{"inner": {"name": "other", "big": 5}, "id": "x"}'
    msg = _binding("Publish_0").build(body, "", {"inner.name": "topics/t"})
    assert msg.inner.name == "topics/t" and msg.inner.big == 5 and msg.id == "x"


def test_build_body_field_and_query() -> None:
    from multidict import MultiDict

    query = MultiDict([("id", "q"), ("tags", "a"), ("tags", "b"), ("inner.name", "ignored: bound by the body")])
    msg = _binding("Get_2").build(b'{"name": "n", "tags": ["t"]}', "", {}, None, query)
    assert msg.inner.name == "n" and list(msg.inner.tags) == ["t"]
    assert msg.id == "q" and list(msg.tags) == ["a", "b"]


def test_build_raw_http_body_request() -> None:
    msg = _binding("Upload_0").build(b"\x00\x01raw", "application/octet-stream; x=1", {})
    assert msg.data == b"\x00\x01raw" and msg.content_type == "application/octet-stream; x=1"


def test_build_headers_field() -> None:
    msg = _binding("Update_0").build(b'{"k": "v"}', "", {"id": "i"}, {"X-One": "1"})
    assert dict(msg.labels) == {"k": "v"} and dict(msg.headers) == {"X-One": "1"} and msg.id == "i"
