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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.core.errors import GatewayError, InvalidArgument, NotFound
from gateway.core.names import validate_name
from gateway.embedded.catalog import Catalog
from gateway.embedded.deadletters import DeadLetters
from gateway.embedded.specs import AlreadyExists, GroupSpec, StationSpec

__all__ = ["QUEUE_GROUP", "ControlPlane"]

log = logging.getLogger("gateway.controlplane")

QUEUE_GROUP = "memgw-control-plane"
Request = dict[str, Any]
Handler = Callable[[Request], Awaitable[bytes]]


class ControlPlane:
    """Answers ``$memphis_*`` requests for one NATS account. ``start(nc)``, then ``stop()``."""

    def __init__(self, *, queue: str = QUEUE_GROUP, catalog: Catalog | None = None, drain_s: float = 5.0) -> None:
        self.queue = queue
        self.drain_s = drain_s
        self.catalog = catalog or Catalog()
        self.dead_letters = DeadLetters(self.catalog, queue=queue, replicas=self.catalog.kv_replicas)
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # subject -> (handler, whether its errors are sent as JSON)
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

    async def start(self, nc: Client) -> None:
        """Open the catalog on ``nc`` (a connected client with JetStream) and start answering."""
        await self.catalog.open(nc)
        await self.dead_letters.open(nc)
        for subject in self._routes:
            self._subs.append(await nc.subscribe(subject, queue=self.queue, cb=self._on_request))
        await nc.flush()

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
            reply = await handler(request)
        except AlreadyExists as err:
            log.debug("%s: %s", msg.subject, err.message)
            reply = _error(err.message, json_errors)
        except GatewayError as err:
            log.info("%s rejected: %s", msg.subject, err.message)
            reply = _error(err.message, json_errors)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            log.info("%s: malformed request: %s", msg.subject, err)
            reply = _error(f"malformed request: {err}", json_errors)
        except Exception:
            log.exception("%s: failed", msg.subject)
            reply = _error("internal error of the control plane", json_errors)
        if msg.reply:
            try:
                await msg.respond(reply)
            except Exception as err:
                log.warning("%s: could not reply: %s", msg.subject, err)

    # Handlers: each returns the success reply or raises a GatewayError.

    async def _create_station(self, req: Request) -> bytes:
        dls = req.get("dls_configuration") or {}
        if not isinstance(dls, dict):
            raise InvalidArgument("dls_configuration must be an object")
        spec = StationSpec(
            name=_str(req, "name"),
            retention_type=_str(req, "retention_type", "message_age_sec"),
            retention_value=_int(req, "retention_value", 3600),
            storage_type=_str(req, "storage_type", "file"),
            replicas=_int(req, "replicas", 1),
            idempotency_window_ms=_int(req, "idempotency_window_in_ms", 120_000),
            partitions_number=_int(req, "partitions_number", 1) or 1,
            schema_name=_str(req, "schema_name", ""),
            schemaverse_to_dls=_bool(dls, "Schemaverse", True),
            poison_to_dls=_bool(dls, "poison", True),
            dls_station=_str(req, "dls_station", ""),
            tiered_storage_enabled=_bool(req, "tiered_storage_enabled", False),
            created_by=_str(req, "username", ""),
        )
        await self.catalog.create_station(spec)
        return b""

    async def _destroy_station(self, req: Request) -> bytes:
        name = _str(req, "station_name")
        if not await self.catalog.destroy_station(name):
            raise NotFound(f"Station {name} does not exist")
        return b""

    async def _create_producer(self, req: Request) -> bytes:
        _name(req, "name", "producer")
        station = _str(req, "station_name")
        if _int(req, "req_version", 1) >= 2:  # the Memphis server creates missing stations since v2
            info = await self.catalog.ensure_station(station, _str(req, "username", ""))
        elif (found := await self.catalog.station_info(station)) is not None:
            info = found
        else:
            raise NotFound(f"Station {station} does not exist")
        return _json(
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

    async def _destroy_client(self, req: Request) -> bytes:
        # Producers and consumers hold no server-side state of ours; durables are kept.
        _str(req, "station_name")
        return b""

    async def _create_consumer(self, req: Request) -> bytes:
        name = _name(req, "name", "consumer")
        station = _str(req, "station_name")
        group = GroupSpec(
            name=_str(req, "consumers_group", "") or name,
            max_ack_time_ms=_int(req, "max_ack_time_ms", 30_000),
            max_msg_deliveries=_int(req, "max_msg_deliveries", 10),
            start_consume_from_sequence=_int(req, "start_consume_from_sequence", 1),
            last_messages=_int(req, "last_messages", -1),
        )
        if group.start_consume_from_sequence <= 0:
            raise InvalidArgument("start_consume_from_sequence has to be a positive number")
        if group.last_messages < -1:
            raise InvalidArgument("min value for last_messages is -1")
        if group.start_consume_from_sequence > 1 and group.last_messages > -1:
            raise InvalidArgument(
                "Consumer creation options can't contain both start_consume_from_sequence and last_messages"
            )
        info = await self.catalog.ensure_consumer_group(station, group, _str(req, "username", ""))
        return _json(
            {
                "error": "",
                "partitions_update": {"partitions_list": info.partitions},
                "schema_update": info.schema_update,
            }
        )

    async def _create_schema(self, req: Request) -> bytes:
        await self.catalog.create_schema(
            _str(req, "name"),
            _str(req, "type"),
            _str(req, "schema_content"),
            created_by=_str(req, "created_by_username", ""),
            message_struct_name=_str(req, "message_struct_name", ""),
        )
        return _json({"error": ""})

    async def _attach_schema(self, req: Request) -> bytes:
        await self.catalog.attach_schema(_str(req, "name"), _str(req, "station_name"))
        return b""

    async def _detach_schema(self, req: Request) -> bytes:
        await self.catalog.detach_schema(_str(req, "station_name"))
        return b""


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _error(text: str, as_json: bool) -> bytes:
    return _json({"error": text}) if as_json else text.encode()


_MISSING: Any = object()


def _str(req: Request, key: str, default: str = _MISSING) -> str:
    value = req.get(key, default)
    if value is _MISSING or (value is None and default is _MISSING):
        raise InvalidArgument(f"{key} is missing")
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"{key} must be a string")
    return value


def _int(req: Request, key: str, default: int) -> int:
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{key} must be an integer")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidArgument(f"{key} must be an integer")
    return int(value)


def _bool(req: Request, key: str, default: bool) -> bool:
    value = req.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key} must be a boolean")
    return value


def _name(req: Request, key: str, kind: str) -> str:
    name = _str(req, key)
    if reason := validate_name(name, kind):
        raise InvalidArgument(reason)
    return name
