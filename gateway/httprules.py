"""``google.api.http`` rules -> bindings, and how path and query values fill fields.

At start-up :func:`build_bindings` reads the ``google.api.http`` option of every
:class:`~gateway.calls.Endpoint` (its primary rule, then its
``additional_bindings``, in declaration order) together with the
``memgw.v1.transcoding`` option, and checks them the way grpc-gateway does
(``internal/descriptor/services.go``): a GET or DELETE with a body, a nested
``additional_bindings``, path parameters on a client-streaming method, or a body,
path or response field that does not exist are :class:`HttpRuleError`.

Everything a request needs is precomputed on the :class:`Binding`: the compiled
template, the codecs, the resolved path fields and the query filter.

Textual values (path captures, query values) are converted by field type, as
grpc-gateway's ``runtime/convert.go`` and ``runtime/query.go`` do; a mismatch is
InvalidArgument ``type mismatch, parameter: x, error: ...``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from memgw.v1 import options_pb2

from gateway.calls import Endpoint
from gateway.errors import InvalidArgument
from gateway.jsoncodec import INT_RANGES, MessageCodec, assign, codec_for, decode_base64, loads
from gateway.pathtemplate import InvalidTemplateError, PathTemplate, compile_template

__all__ = ["HTTP_BODY", "Binding", "HttpRuleError", "QueryBinder", "bindings_for", "build_bindings", "parse_text"]

HTTP_BODY = "google.api.HttpBody"
_F = FieldDescriptor
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NaN|[+-]?Inf(?:inity)?")
_MAP_KEY = re.compile(r"^(.+)\[(.*)\]$")
_TEXT_WKT = frozenset(f"google.protobuf.{n}" for n in ("Timestamp", "Duration", "FieldMask"))
_JSON_WKT = frozenset(f"google.protobuf.{n}" for n in ("Struct", "Value", "ListValue"))
_WRAPPER_SUFFIX = "Value"


class HttpRuleError(ValueError):
    """A ``google.api.http`` rule the transcoder cannot serve (raised at start-up)."""


# ---------------------------------------------------------------- text values


def parse_text(fd: FieldDescriptor, text: str) -> Any:
    """One textual value converted for field ``fd`` (its element type if repeated); ValueError."""
    t = fd.type
    if t == _F.TYPE_STRING:
        return text
    if t in INT_RANGES:
        if not _INT.fullmatch(text):
            raise ValueError(f"invalid integer {text!r}")
        n = int(text)
        lo, hi, _ = INT_RANGES[t]
        if not lo <= n <= hi:
            raise ValueError(f"{text} is out of range")
        return n
    if t == _F.TYPE_BOOL:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"invalid boolean {text!r}")
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        if not _FLOAT.fullmatch(text):
            raise ValueError(f"invalid number {text!r}")
        return float(text.replace("Infinity", "inf").replace("Inf", "inf"))
    if t == _F.TYPE_ENUM:
        value = fd.enum_type.values_by_name.get(text)
        if value is not None:
            return value.number
        if _INT.fullmatch(text) and -(2**31) <= int(text) < 2**31:
            return int(text)
        raise ValueError(f"invalid value {text!r} for enum {fd.enum_type.full_name}")
    if t == _F.TYPE_BYTES:
        try:
            return decode_base64(text, fd.name)
        except InvalidArgument:
            raise ValueError("invalid base64") from None
    if fd.message_type is not None:
        return _parse_message_text(fd.message_type, text)
    raise ValueError(f"unsupported field type {t}")


def _parse_message_text(desc: Descriptor, text: str) -> Message:
    msg = codec_for(desc).message_class()
    name = desc.full_name
    try:
        if name in _TEXT_WKT:
            json_format.Parse(orjson.dumps(text), msg)
        elif name in _JSON_WKT:
            json_format.Parse(text, msg)
        elif name.startswith("google.protobuf.") and name.endswith(_WRAPPER_SUFFIX) and "value" in desc.fields_by_name:
            msg.value = parse_text(desc.fields_by_name["value"], text)
        else:
            raise ValueError(f"a {name} cannot be given as text")
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    return msg


def _text_message(desc: Descriptor) -> bool:
    """Whether a message type has a textual form (Timestamp, Duration, wrappers, ...)."""
    name = desc.full_name
    return name in _TEXT_WKT or name in _JSON_WKT or (name.startswith("google.protobuf.") and name.endswith("Value"))


def resolve_path(desc: Descriptor, path: str) -> tuple[FieldDescriptor, ...] | None:
    """Resolve a dotted field path (proto or lowerCamel names); None if a name is unknown.

    ValueError when the path goes through something other than a singular message.
    """
    out: list[FieldDescriptor] = []
    parts = path.split(".")
    for i, part in enumerate(parts):
        fc = codec_for(desc).by_key.get(part)
        if fc is None:
            return None
        out.append(fc.field)
        if i < len(parts) - 1:
            fd = fc.field
            if fd.message_type is None or fd.is_repeated:
                raise ValueError(f"{'.'.join(f.name for f in out)} is not a message")
            desc = fd.message_type
    return tuple(out)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _target(msg: Message, path: Sequence[FieldDescriptor]) -> Message:
    for fd in path[:-1]:
        msg = getattr(msg, fd.name)
    return msg


def set_text(msg: Message, path: Sequence[FieldDescriptor], values: Sequence[str]) -> None:
    """Set the leaf of ``path`` from text values (many only for repeated fields); ValueError."""
    leaf = path[-1]
    target = _target(msg, path)
    if leaf.is_repeated:
        assign(target, leaf, [parse_text(leaf, v) for v in values])
        return
    if len(values) != 1:
        raise ValueError("too many values")
    oneof = leaf.containing_oneof
    if oneof is not None and len(oneof.fields) > 1:
        chosen = target.WhichOneof(oneof.name)
        if chosen is not None and chosen != leaf.name:
            raise ValueError(f"field {chosen!r} of the same oneof is already set")
    assign(target, leaf, parse_text(leaf, values[0]))


def _leaf_is_set(msg: Message, path: Sequence[FieldDescriptor]) -> bool:
    for fd in path[:-1]:
        if not msg.HasField(fd.name):
            return False
        msg = getattr(msg, fd.name)
    leaf = path[-1]
    return codec_for(msg.DESCRIPTOR).is_set(msg, leaf.name)


class QueryBinder:
    """Binds query parameters to the fields of one request type, minus a filter."""

    __slots__ = ("_desc", "_excluded", "only_unset")

    def __init__(self, desc: Descriptor, excluded: Iterable[tuple[str, ...]], *, only_unset: bool) -> None:
        self._desc = desc
        self._excluded = tuple(excluded)  # field-name paths already bound by path, body or headers
        self.only_unset = only_unset  # query_with_body: only fields the body left unset

    def _filtered(self, names: tuple[str, ...]) -> bool:
        return any(names[: len(ex)] == ex for ex in self._excluded)

    def bind(self, msg: Message, query: Mapping[str, str]) -> None:
        """Apply ``query`` (a multidict: ``getall`` gives repeated keys) to ``msg``; InvalidArgument."""
        getall = getattr(query, "getall", None)
        for key in dict.fromkeys(query):
            if key == "authorization":
                continue
            values: list[str] = getall(key) if getall is not None else [query[key]]
            map_key: str | None = None
            m = _MAP_KEY.match(key)
            field_path = m.group(1) if m else key
            try:
                path = resolve_path(self._desc, field_path)
            except ValueError as exc:
                raise InvalidArgument(f"invalid query parameter {key!r}: {exc}") from None
            if path is None or self._filtered(tuple(f.name for f in path)):
                continue  # unknown keys are ignored, as grpc-gateway does
            leaf = path[-1]
            if m is not None:
                if not _is_map(leaf):
                    continue
                map_key = m.group(2)
            elif _is_map(leaf) or (leaf.message_type is not None and leaf.is_repeated):
                continue
            if self.only_unset and _leaf_is_set(msg, path) and map_key is None:
                continue
            try:
                if map_key is None:
                    set_text(msg, path, values)
                else:
                    _set_map_entry(_target(msg, path), leaf, map_key, values)
            except ValueError as exc:
                raise InvalidArgument(f"invalid query parameter {key!r}: {exc}") from None


def _set_map_entry(target: Message, leaf: FieldDescriptor, key: str, values: Sequence[str]) -> None:
    if len(values) != 1:
        raise ValueError("too many values")
    entry = leaf.message_type
    k = parse_text(entry.fields_by_name["key"], key)
    value_fd = entry.fields_by_name["value"]
    v = parse_text(value_fd, values[0])
    container = getattr(target, leaf.name)
    if value_fd.message_type is None:
        container[k] = v
    else:
        container[k].CopyFrom(v)


# ---------------------------------------------------------------- bindings


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """One HTTP binding of one RPC, with everything precomputed for the hot path."""

    endpoint: Endpoint
    index: int  # 0 for the primary rule, then additional_bindings in order
    http_method: str  # "GET", "POST", ... (custom kinds as given)
    template: PathTemplate
    body: str  # "", "*" or a top-level field name
    response_body: str
    headers_field: str
    error_body: int  # options_pb2.ErrorBody
    query_with_body: bool
    request_codec: MessageCodec
    response_codec: MessageCodec
    path_params: tuple[tuple[str, tuple[FieldDescriptor, ...]], ...]
    raw_body: bool  # the body is a google.api.HttpBody: raw bytes, no JSON
    raw_response: bool  # the response (or response_body field) is a google.api.HttpBody
    query: QueryBinder | None
    rule: http_pb2.HttpRule = field(repr=False)

    # Path fields set with a plain setattr (top-level singular strings); the others go through set_text.
    simple_path: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.endpoint.method.full_name}_{self.index}"

    def set_path_params(self, msg: Message, captured: Mapping[str, str]) -> None:
        """Apply the captured path values to ``msg``; InvalidArgument on a type mismatch."""
        for name, path in self.path_params:
            value = captured[name]
            if name in self.simple_path:
                setattr(msg, name, value)
                continue
            try:
                set_text(msg, path, value.split(",") if path[-1].is_repeated else (value,))
            except ValueError as exc:
                raise InvalidArgument(f"type mismatch, parameter: {name}, error: {exc}") from None

    def build(
        self,
        data: bytes,
        content_type: str,
        captured: Mapping[str, str],
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Message:
        """The request message: body, then path captures, then headers_field, then query; InvalidArgument.

        ``data`` is the raw body (ignored without a body rule), ``headers`` the already filtered
        request headers for ``headers_field``, ``query`` a multidict of the query string.
        """
        codec = self.request_codec
        body = self.body
        if not body:
            msg = codec.message_class()
        elif self.raw_body:
            if body == "*":
                msg = codec.message_class(content_type=content_type, data=data)
            else:
                msg = codec.message_class()
                part = getattr(msg, body)
                part.content_type = content_type
                part.data = data
        elif body == "*":
            msg = codec.loads(data)
        else:
            msg = codec.message_class()
            if data:
                codec.merge_field(msg, body, loads(data))
        if captured:
            if len(self.simple_path) == len(self.path_params):
                for name in self.simple_path:
                    setattr(msg, name, captured[name])
            else:
                self.set_path_params(msg, captured)
        if headers is not None and self.headers_field:
            target = getattr(msg, self.headers_field)
            for key, value in headers.items():  # faster than the map's (Python-level) update()
                target[key] = value
        if query and self.query is not None:
            self.query.bind(msg, query)
        return msg

    def decode_frame(self, line: bytes) -> Message:
        """One NDJSON frame of a client stream as a request message."""
        codec = self.request_codec
        if self.body in ("*", ""):
            return codec.loads(line)
        msg = codec.message_class()
        codec.merge_field(msg, self.body, loads(line))
        return msg


_METHODS = {"get": "GET", "put": "PUT", "post": "POST", "delete": "DELETE", "patch": "PATCH"}


def bindings_for(
    endpoint: Endpoint, *, allow_delete_body: bool = False, unbound_methods: bool = False
) -> list[Binding]:
    """The bindings of one endpoint, in declaration order (none if it is unannotated)."""
    method = endpoint.method
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    if rule.WhichOneof("pattern") is None:
        if rule.additional_bindings:
            raise HttpRuleError(f"{method.full_name}: google.api.http has additional_bindings but no pattern")
        if not unbound_methods:
            return []
        rule = http_pb2.HttpRule(post=f"/{endpoint.service.full_name}/{method.name}", body="*")
    rules = [rule, *rule.additional_bindings]
    out = []
    for index, r in enumerate(rules):
        where = f"{method.full_name} (binding {index})"
        if index > 0 and r.additional_bindings:
            raise HttpRuleError(f"{where}: additional_bindings may not be nested")
        out.append(_binding(endpoint, index, r, where, allow_delete_body))
    return out


def _binding(endpoint: Endpoint, index: int, rule: http_pb2.HttpRule, where: str, allow_delete_body: bool) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise HttpRuleError(f"{where}: no HTTP pattern (get, post, ...)")
    if kind == "custom":
        http_method, template_text = rule.custom.kind.upper(), rule.custom.path
        if not re.fullmatch(r"[A-Z]+", http_method):
            raise HttpRuleError(f"{where}: invalid custom method {rule.custom.kind!r}")
    else:
        http_method, template_text = _METHODS[kind], getattr(rule, kind)
    try:
        template = compile_template(template_text)
    except InvalidTemplateError as exc:
        raise HttpRuleError(f"{where}: {exc}") from None
    body = rule.body
    if body and http_method == "GET":
        raise HttpRuleError(f"{where}: GET may not have a body")
    if body and http_method == "DELETE" and not allow_delete_body:
        raise HttpRuleError(f"{where}: DELETE may not have a body (allow_delete_body is off)")
    if endpoint.client_streaming and template.fields:
        raise HttpRuleError(f"{where}: cannot use path parameter in client streaming")
    req: Descriptor = endpoint.method.input_type
    resp: Descriptor = endpoint.method.output_type
    request_codec, response_codec = codec_for(req), codec_for(resp)

    body_fd = None
    if body and body != "*":
        body_fd = req.fields_by_name.get(body)
        if body_fd is None:
            raise HttpRuleError(f"{where}: body field {body!r} is not a field of {req.full_name}")
    raw_body = (body == "*" and req.full_name == HTTP_BODY) or (
        body_fd is not None and body_fd.message_type is not None and body_fd.message_type.full_name == HTTP_BODY
    )

    path_params = []
    for name in template.fields:
        try:
            path = resolve_path(req, name)
        except ValueError as exc:
            raise HttpRuleError(f"{where}: path parameter {name!r}: {exc}") from None
        if path is None:
            raise HttpRuleError(f"{where}: path parameter {name!r} is not a field of {req.full_name}")
        leaf = path[-1]
        if leaf.message_type is not None and (leaf.is_repeated or not _text_message(leaf.message_type)):
            raise HttpRuleError(f"{where}: path parameter {name!r} must be a scalar field")
        if body_fd is not None and path[0].name == body_fd.name:
            raise HttpRuleError(f"{where}: path parameter {name!r} is inside the body field {body!r}")
        path_params.append((name, path))

    response_body = rule.response_body
    raw_response = resp.full_name == HTTP_BODY
    if response_body:
        rfd = resp.fields_by_name.get(response_body)
        if rfd is None:
            raise HttpRuleError(f"{where}: response_body {response_body!r} is not a field of {resp.full_name}")
        raw_response = rfd.message_type is not None and not rfd.is_repeated and rfd.message_type.full_name == HTTP_BODY

    transcoding = endpoint.method.GetOptions().Extensions[options_pb2.transcoding]
    headers_field = transcoding.headers_field
    if headers_field:
        hfd = req.fields_by_name.get(headers_field)
        if hfd is None or not _is_map(hfd) or any(f.type != _F.TYPE_STRING for f in hfd.message_type.fields):
            raise HttpRuleError(f"{where}: headers_field {headers_field!r} must be a map<string, string> field")
        if headers_field == body or any(p[0].name == headers_field for _, p in path_params):
            raise HttpRuleError(f"{where}: headers_field {headers_field!r} is also bound by the body or the path")

    query = None
    if not endpoint.client_streaming and (body != "*" or transcoding.query_with_body):
        excluded = [tuple(f.name for f in p) for _, p in path_params]
        if body_fd is not None:
            excluded.append((body_fd.name,))
        if headers_field:
            excluded.append((headers_field,))
        query = QueryBinder(req, excluded, only_unset=body == "*")

    return Binding(
        endpoint=endpoint,
        index=index,
        http_method=http_method,
        template=template,
        body=body,
        response_body=response_body,
        headers_field=headers_field,
        error_body=transcoding.error_body,
        query_with_body=transcoding.query_with_body,
        request_codec=request_codec,
        response_codec=response_codec,
        path_params=tuple(path_params),
        raw_body=raw_body,
        raw_response=raw_response,
        query=query,
        rule=rule,
        simple_path=tuple(
            name for name, p in path_params if len(p) == 1 and p[0].type == _F.TYPE_STRING and not p[0].is_repeated
        ),
    )


def build_bindings(
    endpoints: Iterable[Endpoint], *, allow_delete_body: bool = False, unbound_methods: bool = False
) -> list[Binding]:
    """Every binding of every endpoint, in declaration order; HttpRuleError on a bad rule."""
    out: list[Binding] = []
    seen: dict[tuple[str, str], str] = {}
    for endpoint in endpoints:
        for b in bindings_for(endpoint, allow_delete_body=allow_delete_body, unbound_methods=unbound_methods):
            key = (b.http_method, b.template.source)
            if key in seen:
                raise HttpRuleError(f"{b.name}: {key[0]} {key[1]} is already bound by {seen[key]}")
            seen[key] = b.name
            out.append(b)
    return out
