"""NATS subject permissions of a Memphis user, derived from its station patterns.

What memphis-py (and the gateway's own sessions, which are memphis-py connections) needs,
per docs/memphis-py.md (sections 1.3 to 1.6):

* always: replies on ``_INBOX.>``, the SDK's pushes (``$memphis_sdk_clients_updates``), every
  control-plane request (``REQUEST_SUBJECTS``: the control plane is told by nats-server who sent
  each one and answers it with that user's rights, so a refusal reads "user bob may not ..."
  rather than a permissions violation), ``$JS.API.INFO`` and ``$JS.API.STREAM.NAMES`` (nats-py
  looks a stream up by subject);
* produce to a station: publish on ``<internal>$<p>.final`` of its partitions, and its
  schema and function updates;
* consume from a station: the JetStream API of its partition streams' consumers
  (info, next message), acknowledgements (``$JS.ACK.<stream>.>``), its DLS subject.

NATS wildcards cover whole subject tokens only, and a partition stream's token is
``<internal>$<p>``. So a literal station name grants partitions 1..``PARTITIONS_GRANTED``, the
pattern ``*`` grants every station (``*`` tokens), and a pattern with a wildcard inside a name
(``web-*``) grants nothing on the broker: the gateway enforces it on what it serves, SDK
connections of that user cannot reach those stations.

Management users get no limits; destroying stations and managing schemas stays with them (the
control plane's rule, ``gateway.embedded.controlplane``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.core.names import internal_name
from gateway.embedded.controlplane import REQUEST_SUBJECTS

PARTITIONS_GRANTED = 16
_ALWAYS_PUBLISH = (
    *REQUEST_SUBJECTS,
    "$memphis_pm_acks", "$memphis_schemaverse_dls", "$memphis_notifications", "$memphis_nacked_dls",
    "$JS.API.INFO", "$JS.API.STREAM.NAMES",
)
_ALWAYS_SUBSCRIBE = ("_INBOX.>", "$memphis_sdk_clients_updates")
_WILDCARDS = set("*?[]")


def _streams(pattern: str) -> list[tuple[str, str]]:
    """(internal name token, partition stream tokens) of a pattern; [] if NATS cannot express it."""
    if pattern == "*":
        return [("*", "*")]
    if _WILDCARDS & set(pattern):
        return []
    name = internal_name(pattern)
    return [(name, f"{name}${p}") for p in range(1, PARTITIONS_GRANTED + 1)] + [(name, name)]  # + legacy layout


def user_permissions(produce: Iterable[str], consume: Iterable[str]) -> dict[str, Any]:
    """The nats-server ``permissions`` block of an application user."""
    publish: list[str] = list(_ALWAYS_PUBLISH)
    subscribe: list[str] = list(_ALWAYS_SUBSCRIBE)
    for pattern in produce:
        for name, stream in _streams(pattern):
            publish.append(f"{stream}.final")
            publish.append(f"$JS.API.STREAM.INFO.{stream}")
            subscribe += [f"$memphis_schema_updates_{name}", f"$memphis_functions_updates_{name}"]
    for pattern in consume:
        for name, stream in _streams(pattern):
            publish += [
                f"$JS.API.STREAM.INFO.{stream}",
                f"$JS.API.CONSUMER.INFO.{stream}.*",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
                f"$JS.ACK.{stream}.>",
            ]
            subscribe += [f"$memphis_dls_{name}.*", f"$memphis_schema_updates_{name}"]
    return {"publish": {"allow": sorted(set(publish))}, "subscribe": {"allow": sorted(set(subscribe))}}
