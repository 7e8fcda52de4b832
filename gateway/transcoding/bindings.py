"""``google.api.http`` rules -> bindings, and how a request becomes the request message.

At start-up :func:`build_bindings` reads the ``google.api.http`` option of every
:class:`~gateway.rpc.call.Endpoint` (its primary rule, then its
``additional_bindings``, in declaration order) together with the
``memgw.v1.transcoding`` option, and checks them the way grpc-gateway does
(``internal/descriptor/services.go``): a GET or DELETE with a body, a nested
``additional_bindings``, path parameters on a client-streaming method, or a body,
path or response field that does not exist are :class:`HttpRuleError`.

Everything a request needs is precomputed on the :class:`Binding`: the compiled
template, the codecs, the resolved path fields and the query filter.

Textual values are converted by ``convert`` (path captures) and ``query`` (the query string).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from memgw.v1 import options_pb2

from gateway.core.errors import InvalidArgument
from gateway.rpc.call import Endpoint
from gateway.transcoding.convert import is_map, resolve_path, set_text, text_message
from gateway.transcoding.jsoncodec import MessageCodec, codec_for, loads
from gateway.transcoding.pathtemplate import InvalidTemplateError, PathTemplate, compile_template
from gateway.transcoding.query import QueryBinder

__all__ = ["HTTP_BODY", "Binding", "HttpRuleError", "bindings_for", "build_bindings"]

HTTP_BODY = "google.api.HttpBody"
_F = FieldDescriptor


class HttpRuleError(ValueError):
    """A ``google.api.http`` rule the transcoder cannot serve (raised at start-up)."""


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
    sse: bool = False  # a server stream answered as text/event-stream (StreamFormat SSE)
    event_id_field: str = ""  # SSE: the response field that is the event id

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
        if leaf.message_type is not None and (leaf.is_repeated or not text_message(leaf.message_type)):
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
        if hfd is None or not is_map(hfd) or any(f.type != _F.TYPE_STRING for f in hfd.message_type.fields):
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

    sse = transcoding.stream_format == options_pb2.STREAM_FORMAT_SSE
    if sse:
        idf = resp.fields_by_name.get(transcoding.event_id_field)
        if not endpoint.server_streaming:
            raise HttpRuleError(f"{where}: stream_format SSE needs a server-streaming method")
        if idf is None or idf.type != _F.TYPE_STRING or idf.is_repeated:
            raise HttpRuleError(f"{where}: event_id_field {transcoding.event_id_field!r} must be a string field")
        if not response_body:
            raise HttpRuleError(f"{where}: stream_format SSE needs a response_body (the event data)")
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
        sse=sse,
        event_id_field=transcoding.event_id_field,
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
