"""The authorization model: what a principal may do, checked once per call at admission.

A principal is a user (``management``: everything; ``application``: produce to and consume
from the stations its patterns match) or an API key, which acts as its user narrowed to the
key's stations and actions (never wider than the user). Patterns are fnmatch-style
(``*``, ``?``, ``[..]``), matched against the lower-cased station name.

Each RPC declares its action in the protos (``(memgw.v1.access).action``) and, for a single
station, the request field naming it (``station_field``); ``gateway.auth.guard`` checks that
generically, for gRPC and REST alike. A call touching several stations (a produce stream)
checks each through ``CallContext.authorize``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from gateway.core.errors import InvalidArgument, PermissionDenied

PRODUCE, CONSUME, MANAGE = "produce", "consume", "manage"
MANAGEMENT, APPLICATION = "management", "application"
ROLES = (MANAGEMENT, APPLICATION)
STATION_ACTIONS = (PRODUCE, CONSUME)
MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 128
_VERBS = {PRODUCE: "produce to", CONSUME: "consume from"}
_CACHE_SIZE = 4096


def patterns(values: Iterable[str], what: str) -> tuple[str, ...]:
    """Validated, lower-cased station-name patterns (InvalidArgument saying what is wrong)."""
    out = []
    for value in values:
        pattern = value.strip().lower()
        if not pattern or len(pattern) > MAX_PATTERN_LENGTH or not pattern.isascii() or pattern.isspace():
            raise InvalidArgument(f"{what}: each pattern must be 1 to {MAX_PATTERN_LENGTH} ASCII characters")
        if any(c in pattern for c in " \t\r\n>"):
            raise InvalidArgument(f"{what}: pattern {pattern!r} may not hold spaces or '>'")
        out.append(pattern)
    if len(out) > MAX_PATTERNS:
        raise InvalidArgument(f"{what}: at most {MAX_PATTERNS} patterns")
    return tuple(dict.fromkeys(out))


def matches(station: str, pats: tuple[str, ...]) -> bool:
    return any(p == "*" or fnmatchcase(station, p) for p in pats)


@dataclass(slots=True, eq=False)
class Access:
    """What one principal may do; ``check`` raises PermissionDenied naming the station and action."""

    who: str  # "user bob", "api key 1a2b (user bob)"
    manage: bool = False
    produce: tuple[str, ...] = ()
    consume: tuple[str, ...] = ()
    # an API key's narrowing: (station patterns, actions); None for a user
    scope: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    _seen: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    @classmethod
    def everything(cls, who: str) -> Access:
        return cls(who=who, manage=True, produce=("*",), consume=("*",))

    def narrowed(self, who: str, stations: tuple[str, ...], actions: tuple[str, ...]) -> Access:
        """This access seen through an API key: only ``actions`` on ``stations``, never manage."""
        return Access(who=who, produce=self.produce, consume=self.consume, scope=(stations, actions))

    def allows(self, action: str, station: str = "") -> bool:
        if action == MANAGE:
            return self.manage and self.scope is None
        seen = self._seen.get((action, station))
        if seen is not None:
            return seen
        allowed = matches(station, self.produce if action == PRODUCE else self.consume)
        if allowed and self.scope is not None:
            stations, actions = self.scope
            allowed = action in actions and matches(station, stations)
        if len(self._seen) >= _CACHE_SIZE:
            self._seen.clear()
        self._seen[(action, station)] = allowed
        return allowed

    def check(self, action: str, station: str = "") -> None:
        if self.allows(action, station):
            return
        if action == MANAGE:
            raise PermissionDenied(f"{self.who} may not manage users, API keys, stations or schemas "
                                   "(management users only)")
        raise PermissionDenied(f"{self.who} may not {_VERBS.get(action, action)} station {station}")
