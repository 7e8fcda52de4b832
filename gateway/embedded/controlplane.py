"""The Memphis control plane, answered over NATS, so that unmodified memphis-py (and the
gateway itself) works against a stock nats-server with JetStream.

memphis-py sends its creation requests as core-NATS requests on ``$memphis_*`` subjects
(docs/memphis-py.md, "Request/reply subjects"); the Memphis server is archived, so we answer them. Each subject is
subscribed with one queue group, so several gateway replicas can run a ``ControlPlane``
and exactly one answers each request. Replicas keep no state: stations and schemas live in
JetStream KV (``gateway.embedded.catalog``).

Reply formats are the SDK's, not ours to choose:

===================================  ==========================================
subject                              reply
===================================  ==========================================
``$memphis_station_creations``       plain text, "" or the error
``$memphis_station_destructions``    plain text
``$memphis_producer_creations``      JSON (``error``, ``schema_update``, ...)
``$memphis_producer_destructions``   plain text
``$memphis_consumer_creations``      JSON on success, **plain-text errors**: a JSON
                                     error reaches memphis-py callers as
                                     "'dict' object has no attribute 'replace'" (docs/memphis-py.md B4)
``$memphis_consumer_destructions``   plain text
``$memphis_schema_creations``        JSON ``{"error": ...}``
``$memphis_schema_attachments``      plain text
``$memphis_schema_detachments``      plain text
===================================  ==========================================

Unlike the Memphis server, destroying a consumer never deletes its group's durable: a
gateway (or any client) that re-creates its consumer per request would otherwise lose the
group's position each time. Durables go away with their station.

The gateway uses the same logic without a NATS round trip through ``ControlPlane.catalog``.

Who asks: the requester's rights
--------------------------------
The control plane acts on the catalog with its own (root) connection, so it must itself hold
each request to the rights of whoever sent it. The ``username`` field every memphis-py payload
carries is a claim any client can forge, and a NATS message says nothing else about its sender
within one account. nats-server does: a request that crosses accounts through a *service import*
gets a ``Nats-Request-Info`` header, set by the server (a client's own header of that name is
replaced, server/client.go ``processServiceImport``), holding the sender's account and, when the
import is declared with ``share: true``, its user (``"user": "bob$1"``). The real Memphis server
uses the same arrangement (tenants' accounts import the ``$memphis_*`` services of a ``$memphis``
account; docs/memphis-py.md).

So the embedded broker (``EmbeddedBroker.control_password``) puts the control plane in an account
of its own, ``CONTROL_ACCOUNT``, which exports ``REQUEST_SUBJECTS`` as services; the Memphis
account, where every user and the streams live, imports them with ``share: true``. The control
plane subscribes with a ``CONTROL_USER`` connection (``start(nc, requests_nc=...)``) and answers
with the Memphis account's ``nc``. Three modes, from ``ControlPlane(rights=..., verified=...)``:

* **verified** (``rights`` and ``verified=True``; the embedded broker, and ``--workers`` children
  on it): the requester is the header's user; a request without the header is refused.
* **claimed** (``rights``, ``verified=False``; ``--control-plane`` against an external broker
  whose operator did not set up that account): the requester is the payload's ``username``.
  This only stops honest mistakes and SDK users acting under their own name (an application
  user attaching a schema to another's station is refused); a client that claims to be root is
  believed. The broker's own permissions still decide what the SDK can do with the streams.
* **trusted** (``rights=None``; connection-token mode, where every client holds root's token,
  and tests): every requester acts as root.

``rights(username)`` answers the requester's rights (``gateway.auth.Access`` satisfies ``Rights``);
it may raise a ``GatewayError`` (a deleted user). What each request needs:

=====================================  =============================================
request                                needs
=====================================  =============================================
station creation                       produce to or consume from that station
station destruction                    manage (management users, root)
producer creation                      produce to the station (it may create it)
consumer creation (and its durable)    consume from the station (it may create it)
producer / consumer destruction        nothing (no state is changed)
schema creation, attachment, detachment  manage
schema refusal report (dead letter)    produce to the station it names
=====================================  =============================================

A refusal answers in the request's error format: "<who> may not <action> station <name>".
The records' ``created_by`` is the requester, never the payload's claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.core.errors import GatewayError, InvalidArgument, NotFound, PermissionDenied
from gateway.embedded.catalog import Catalog
from gateway.embedded.deadletters import DeadLetters
from gateway.embedded.requests import (
    CONSUME,
    MANAGE,
    PRODUCE,
    Request,
    Requester,
    Rights,
    bool_field,
    error_reply,
    int_field,
    json_reply,
    name_field,
    str_field,
)
from gateway.embedded.specs import AlreadyExists, GroupSpec, StationSpec

__all__ = ["CONTROL_ACCOUNT", "CONTROL_USER", "QUEUE_GROUP", "REQUEST_SUBJECTS", "ControlPlane", "Rights"]

log = logging.getLogger("gateway.controlplane")

QUEUE_GROUP = "memgw-control-plane"
CONTROL_ACCOUNT = "MEMPHIS_CONTROL"  # the nats-server account the control plane subscribes in
CONTROL_USER = "memgw-control-plane"
REQUEST_INFO = "Nats-Request-Info"  # set by nats-server on a request crossing a service import
REQUEST_SUBJECTS = (
    "$memphis_station_creations",
    "$memphis_station_destructions",
    "$memphis_producer_creations",
    "$memphis_producer_destructions",
    "$memphis_consumer_creations",
    "$memphis_consumer_destructions",
    "$memphis_schema_creations",
    "$memphis_schema_attachments",
    "$memphis_schema_detachments",
)


Handler = Callable[[Request, Requester], Awaitable[bytes]]
RightsOf = Callable[[str], Rights]


class ControlPlane:
    """Answers ``$memphis_*`` requests for one NATS account. ``start(nc)``, then ``stop()``.

    ``rights``: the rights of a requester by user name (None: everyone acts as root);
    ``verified``: the requester is the one nats-server names in ``Nats-Request-Info`` (requests
    reach us through the service import of ``CONTROL_ACCOUNT``), not the payload's claim."""

    def __init__(self, *, queue: str = QUEUE_GROUP, catalog: Catalog | None = None, drain_s: float = 5.0,
                 rights: RightsOf | None = None, verified: bool = False) -> None:
        self.queue = queue
        self.drain_s = drain_s
        self.catalog = catalog or Catalog()
        self.rights = rights
        self.verified = verified
        self.dead_letters = DeadLetters(self.catalog, queue=queue, replicas=self.catalog.kv_replicas)
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # subject -> (handler, whether its errors are sent as JSON); the keys are REQUEST_SUBJECTS
        self._routes: dict[str, tuple[Handler, bool]] = {
            "$memphis_station_creations": (self._create_station, False),
            "$memphis_station_destructions": (self._destroy_station, False),
            "$memphis_producer_creations": (self._create_producer, True),
            "$memphis_producer_destructions": (self._destroy_client, False),
            "$memphis_consumer_creations": (self._create_consumer, False),
            "$memphis_consumer_destructions": (self._destroy_client, False),
            "$memphis_schema_creations": (self._create_schema, True),
            "$memphis_schema_attachments": (self._attach_schema, False),
            "$memphis_schema_detachments": (self._detach_schema, False),
        }

    async def start(self, nc: Client, requests_nc: Client | None = None) -> None:
        """Open the catalog on ``nc`` (a connected client with JetStream) and start answering the
        requests that reach ``requests_nc`` (default ``nc``; the ``CONTROL_USER`` connection when verified)."""
        await self.catalog.open(nc)
        listen = requests_nc or nc
        await self.dead_letters.open(nc, listen, self._may_report)
        for subject in self._routes:
            self._subs.append(await listen.subscribe(subject, queue=self.queue, cb=self._on_request))
        await listen.flush()

    async def stop(self) -> None:
        """Stop answering, let requests in flight finish (up to ``drain_s``), close the catalog."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.dead_letters.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_s)
            for task in pending:
                task.cancel()
        await self.catalog.close()

    # Dispatch

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))  # one slow creation must not hold up the others
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        handler, json_errors = self._routes[msg.subject]
        try:
            request = json.loads(msg.data)
            if not isinstance(request, dict):
                raise InvalidArgument("the request must be a JSON object")
            reply = await handler(request, self._requester(msg, request))
        except AlreadyExists as err:
            log.debug("%s: %s", msg.subject, err.message)
            reply = error_reply(err.message, json_errors)
        except GatewayError as err:
            log.info("%s rejected: %s", msg.subject, err.message)
            reply = error_reply(err.message, json_errors)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            log.info("%s: malformed request: %s", msg.subject, err)
            reply = error_reply(f"malformed request: {err}", json_errors)
        except Exception:
            log.exception("%s: failed", msg.subject)
            reply = error_reply("internal error of the control plane", json_errors)
        if msg.reply:
            try:
                await msg.respond(reply)
            except Exception as err:
                log.warning("%s: could not reply: %s", msg.subject, err)

    def _requester(self, msg: Msg, req: Request) -> Requester:
        """Who sent ``msg``: the user nats-server names (verified mode) or the payload's claim."""
        if self.verified:
            info = (msg.headers or {}).get(REQUEST_INFO)
            try:
                user = json.loads(info)["user"] if info else None
            except (ValueError, TypeError, KeyError):
                user = None
            if not isinstance(user, str) or not user:
                raise PermissionDenied("the requester is unknown: control-plane requests are answered only "
                                       "through the broker's service import, which names the sender")
        else:
            user = req.get("created_by_username" if "created_by_username" in req else "username")
            if not isinstance(user, str):
                user = ""
        name, sep, account = user.rpartition("$")
        username = name if sep and account.isdigit() else user  # "bob$1" -> "bob"
        if self.rights is None:
            return Requester(username, None)
        return Requester(username, self.rights(username))

    def _may_report(self, msg: Msg, station: str) -> bool:
        """A schema refusal reported for ``station`` is stored only if its sender may produce to it
        (else any user could fill another station's dead letters)."""
        try:
            self._requester(msg, {}).check(PRODUCE, station.lower())
        except GatewayError as err:
            log.info("schema refusal for station %s not stored: %s", station, err.message)
            return False
        return True

    # Handlers: each returns the success reply or raises a GatewayError.

    async def _create_station(self, req: Request, who: Requester) -> bytes:
        dls = req.get("dls_configuration") or {}
        if not isinstance(dls, dict):
            raise InvalidArgument("dls_configuration must be an object")
        spec = StationSpec(
            name=str_field(req, "name"),
            retention_type=str_field(req, "retention_type", "message_age_sec"),
            retention_value=int_field(req, "retention_value", 3600),
            storage_type=str_field(req, "storage_type", "file"),
            replicas=int_field(req, "replicas", 1),
            idempotency_window_ms=int_field(req, "idempotency_window_in_ms", 120_000),
            partitions_number=int_field(req, "partitions_number", 1) or 1,
            schema_name=str_field(req, "schema_name", ""),
            schemaverse_to_dls=bool_field(dls, "Schemaverse", True),
            poison_to_dls=bool_field(dls, "poison", True),
            dls_station=str_field(req, "dls_station", ""),
            tiered_storage_enabled=bool_field(req, "tiered_storage_enabled", False),
            created_by=who.username,
        )
        station = spec.name.lower()
        if not (who.may(PRODUCE, station) or who.may(CONSUME, station)):
            who.check(PRODUCE, station)
        await self.catalog.create_station(spec)
        return b""

    async def _destroy_station(self, req: Request, who: Requester) -> bytes:
        name = str_field(req, "station_name")
        who.check(MANAGE)
        if not await self.catalog.destroy_station(name):
            raise NotFound(f"Station {name} does not exist")
        return b""

    async def _create_producer(self, req: Request, who: Requester) -> bytes:
        name_field(req, "name", "producer")
        station = str_field(req, "station_name")
        who.check(PRODUCE, station.lower())
        if int_field(req, "req_version", 1) >= 2:  # the Memphis server creates missing stations since v2
            info = await self.catalog.ensure_station(station, who.username)
        elif (found := await self.catalog.station_info(station)) is not None:
            info = found
        else:
            raise NotFound(f"Station {station} does not exist")
        return json_reply(
            {
                "error": "",
                "schema_update": info.schema_update,
                "schemaverse_to_dls": info.spec.schemaverse_to_dls,
                "send_notification": False,
                "partitions_update": {"partitions_list": info.partitions},
                "station_version": 2,
                "station_partitions_first_functions": {},
            }
        )

    async def _destroy_client(self, req: Request, who: Requester) -> bytes:
        # Producers and consumers hold no server-side state of ours; durables are kept.
        str_field(req, "station_name")
        return b""

    async def _create_consumer(self, req: Request, who: Requester) -> bytes:
        name = name_field(req, "name", "consumer")
        station = str_field(req, "station_name")
        who.check(CONSUME, station.lower())
        group = GroupSpec(
            name=str_field(req, "consumers_group", "") or name,
            max_ack_time_ms=int_field(req, "max_ack_time_ms", 30_000),
            max_msg_deliveries=int_field(req, "max_msg_deliveries", 10),
            start_consume_from_sequence=int_field(req, "start_consume_from_sequence", 1),
            last_messages=int_field(req, "last_messages", -1),
        )
        if group.start_consume_from_sequence <= 0:
            raise InvalidArgument("start_consume_from_sequence has to be a positive number")
        if group.last_messages < -1:
            raise InvalidArgument("min value for last_messages is -1")
        if group.start_consume_from_sequence > 1 and group.last_messages > -1:
            raise InvalidArgument(
                "Consumer creation options can't contain both start_consume_from_sequence and last_messages"
            )
        info = await self.catalog.ensure_consumer_group(station, group, who.username)
        return json_reply(
            {
                "error": "",
                "partitions_update": {"partitions_list": info.partitions},
                "schema_update": info.schema_update,
            }
        )

    async def _create_schema(self, req: Request, who: Requester) -> bytes:
        who.check(MANAGE)
        await self.catalog.create_schema(
            str_field(req, "name"),
            str_field(req, "type"),
            str_field(req, "schema_content"),
            created_by=who.username,
            message_struct_name=str_field(req, "message_struct_name", ""),
        )
        return json_reply({"error": ""})

    async def _attach_schema(self, req: Request, who: Requester) -> bytes:
        who.check(MANAGE)
        await self.catalog.attach_schema(str_field(req, "name"), str_field(req, "station_name"))
        return b""

    async def _detach_schema(self, req: Request, who: Requester) -> bytes:
        who.check(MANAGE)
        await self.catalog.detach_schema(str_field(req, "station_name"))
        return b""




