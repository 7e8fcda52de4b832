"""Query parameters bound to request fields (grpc-gateway's ``query.go``).

Keys are dotted field paths (proto or lowerCamel names); repeated fields take repeated
keys; maps take ``key[mapkey]=value``; unknown keys, and fields already bound by the
path, the body or the headers, are ignored. A field marked ``(memgw.v1.body_only)`` (a
credential) is refused in the query string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from memgw.v1 import options_pb2

from gateway.core.errors import InvalidArgument
from gateway.transcoding.convert import is_map, leaf_is_set, parse_text, resolve_path, set_text, target

_MAP_KEY = re.compile(r"^(.+)\[(.*)\]$")


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
            if path is None:
                continue  # unknown keys are ignored, as grpc-gateway does
            if any(f.GetOptions().Extensions[options_pb2.body_only] for f in path):
                raise InvalidArgument(f"{key!r} is not accepted in the query string (it would end up in logs): "
                                      f"send it in the JSON body")
            if self._filtered(tuple(f.name for f in path)):
                continue
            leaf = path[-1]
            if m is not None:
                if not is_map(leaf):
                    continue
                map_key = m.group(2)
            elif is_map(leaf) or (leaf.message_type is not None and leaf.is_repeated):
                continue
            if self.only_unset and leaf_is_set(msg, path) and map_key is None:
                continue
            try:
                if map_key is None:
                    set_text(msg, path, values)
                else:
                    _set_map_entry(target(msg, path), leaf, map_key, values)
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
