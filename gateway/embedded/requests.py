"""Control-plane requests: who sent one (:class:`Requester`) and the typed fields of its JSON payload.

The payloads are memphis-py's (docs/memphis-py.md, "Request/reply subjects"); a field of the wrong
type is an InvalidArgument naming it, as the Memphis server answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.core.errors import InvalidArgument, PermissionDenied
from gateway.core.names import validate_name

Request = dict[str, Any]
PRODUCE, CONSUME, MANAGE = "produce", "consume", "manage"  # the actions of gateway.auth.access
_VERBS = {PRODUCE: "produce to", CONSUME: "consume from"}
_MISSING: Any = object()


class Rights(Protocol):
    """What a requester may do (``gateway.auth.access.Access`` is one)."""

    who: str

    def allows(self, action: str, station: str = "") -> bool: ...



@dataclass(frozen=True, slots=True)
class Requester:
    """Who sent a request: its broker user name (without ``$<account>``) and rights (None: root's)."""

    username: str
    rights: Rights | None

    def may(self, action: str, station: str = "") -> bool:
        return self.rights is None or self.rights.allows(action, station)

    def check(self, action: str, station: str = "") -> None:
        if self.may(action, station):
            return
        who = self.rights.who if self.rights is not None else f"user {self.username}"
        if action == MANAGE:
            raise PermissionDenied(f"{who} may not manage stations or schemas (management users only)")
        raise PermissionDenied(f"{who} may not {_VERBS[action]} station {station}")



def json_reply(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()



def error_reply(text: str, as_json: bool) -> bytes:
    return json_reply({"error": text}) if as_json else text.encode()



def str_field(req: Request, key: str, default: str = _MISSING) -> str:
    value = req.get(key, default)
    if value is _MISSING or (value is None and default is _MISSING):
        raise InvalidArgument(f"{key} is missing")
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"{key} must be a string")
    return value



def int_field(req: Request, key: str, default: int) -> int:
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{key} must be an integer")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidArgument(f"{key} must be an integer")
    return int(value)



def bool_field(req: Request, key: str, default: bool) -> bool:
    value = req.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key} must be a boolean")
    return value



def name_field(req: Request, key: str, kind: str) -> str:
    name = str_field(req, key)
    if reason := validate_name(name, kind):
        raise InvalidArgument(reason)
    return name
