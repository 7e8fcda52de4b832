"""The station and schema catalog: Memphis metadata in JetStream KV, and the JetStream
streams and durable consumers it stands for.

What the Memphis server keeps in its database is kept here in two KV buckets, so that
every gateway replica is stateless:

* ``memgw_stations``: one ``StationSpec`` (JSON) per station;
* ``memgw_schemas``: one schema (JSON) per name, with all its versions (the last is active).

KV keys are the lower-cased names with ``.`` replaced by ``=`` (``#`` is no valid key
character). A station of N partitions is N streams ``<internal>$<p>`` with subjects
``<internal>$<p>.>``; a consumer group is one durable per partition stream
(see ``gateway.core.names`` and docs/memphis-py.md, "Names").

Reads go through an in-process cache, invalidated by a plain subscription to the buckets'
subjects, so changes made by other replicas are seen at once (and dropped after a reconnect,
when invalidations may have been missed). Changes that memphis-py
clients must hear about are pushed on the subjects the SDK listens to
(``$memphis_schema_updates_<internal>``, ``$memphis_sdk_clients_updates``).

Errors are ``gateway.core.errors`` types; their messages are the ones the Memphis server sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import grpc
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from gateway.core.errors import GatewayError, NotFound, Unavailable
from gateway.core.names import internal_name, stream_name
from gateway.embedded.catalog_schemas import SchemaCatalog
from gateway.embedded.records import broker_errors, check_name, dump, kv_key, station_spec
from gateway.embedded.specs import AlreadyExists, GroupSpec, SchemaInfo, StationInfo, StationSpec

log = logging.getLogger("gateway.controlplane")

STREAM_NAME_IN_USE = 10058  # JetStream: stream name already in use with a different configuration


class Catalog(SchemaCatalog):
    """Stations and schemas of one JetStream account. ``open`` before use."""

    def __init__(
        self, *, stations_bucket: str = "memgw_stations", schemas_bucket: str = "memgw_schemas", kv_replicas: int = 1
    ) -> None:
        self._buckets = (stations_bucket, schemas_bucket)
        self._kv_replicas = kv_replicas
        self.kv_replicas = kv_replicas  # the control plane's streams use as many
        self._nc: Client | None = None
        self._kvs: tuple[KeyValue, KeyValue] | None = None
        self._subs: list[Subscription] = []
        self._cache: dict[str, StationInfo] = {}
        self._generation = 0  # bumped by every invalidation
        self._reconnects = 0  # invalidations may have been missed while disconnected
        self._verified: set[str] = set()  # stations whose streams this process has ensured
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # who created each station (kept from the bucket's updates, every replica's): the station quota
        self.max_stations_per_user = 0  # 0: no quota
        self._creators: dict[str, str] = {}
        self._per_creator: Counter[str] = Counter()

    async def open(self, nc: Client) -> None:
        js = nc.jetstream()
        kvs: list[KeyValue] = []
        with broker_errors():
            for bucket in self._buckets:
                try:
                    kvs.append(await js.key_value(bucket))
                except BucketNotFoundError:
                    kvs.append(await js.create_key_value(bucket=bucket, history=1, replicas=self._kv_replicas))
            self._subs = [await nc.subscribe(f"$KV.{bucket}.>", cb=self._invalidate) for bucket in self._buckets]
        self._nc, self._kvs, self._reconnects = nc, (kvs[0], kvs[1]), nc.stats["reconnects"]
        if self.max_stations_per_user:
            await self._load_creators()

    async def _load_creators(self) -> None:
        """Who created each station, read once from the bucket (then kept by ``_invalidate``)."""
        with broker_errors():
            watcher = await self._stations.watchall()
            try:
                while (entry := await watcher.updates(timeout=10.0)) is not None:  # type: ignore[no-untyped-call]
                    if entry.operation is None and entry.value:
                        self._count_creator(entry.key, entry.value)
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _count_creator(self, key: str, value: bytes | None) -> None:
        """Station ``key`` now holds ``value`` (None/empty: deleted): the per-user counts follow."""
        old = self._creators.pop(key, None)
        if old is not None:
            self._per_creator[old] -= 1
        if value:
            try:
                creator = str(json.loads(value).get("created_by") or "")
            except (ValueError, AttributeError):
                creator = ""
            self._creators[key] = creator
            self._per_creator[creator] += 1

    def check_station_quota(self, username: str) -> None:
        """ResourceExhausted if ``username`` created as many stations as the quota allows."""
        if self.max_stations_per_user and username and self._per_creator[username] >= self.max_stations_per_user:
            raise GatewayError(
                f"station quota reached: {username} created {self._per_creator[username]} stations, the most "
                f"one user may (max_stations_per_user = {self.max_stations_per_user}); destroy unused stations",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            )

    async def close(self) -> None:
        subs, self._subs, self._kvs, self._cache = self._subs, [], None, {}
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _invalidate(self, msg: Msg) -> None:
        self._generation += 1
        prefix = f"$KV.{self._buckets[0]}."
        if msg.subject.startswith(prefix):
            key = msg.subject[len(prefix) :]
            self._cache.pop(key, None)
            if self.max_stations_per_user:
                self._count_creator(key, msg.data)
        else:
            self._cache.clear()  # a schema changed, and stations embed their schema

    @property
    def _stations(self) -> KeyValue:
        if self._kvs is None:
            raise Unavailable("control plane not started")
        return self._kvs[0]

    @property
    def _js(self) -> JetStreamContext:
        if self._nc is None:
            raise Unavailable("control plane not started")
        return self._nc.jetstream()

    async def _get(self, kv: KeyValue, key: str) -> KeyValue.Entry | None:
        with broker_errors():
            try:
                return await kv.get(key)
            except KeyNotFoundError:
                return None

    async def _push(self, subject: str, payload: dict[str, Any]) -> None:
        """Best effort: a lost push must not fail the request that caused it."""
        try:
            assert self._nc is not None
            await self._nc.publish(subject, dump(payload))
        except Exception as err:
            log.warning("could not publish %s: %s", subject, err)

    # Stations

    async def station_info(self, name: str) -> StationInfo | None:
        """The station called ``name``, or None if there is none."""
        check_name(name, "station")
        key = kv_key(name)
        if self._nc is not None and self._nc.stats["reconnects"] != self._reconnects:
            self._reconnects = self._nc.stats["reconnects"]
            self._cache.clear()
            self._generation += 1
        if (hit := self._cache.get(key)) is not None:
            return hit
        generation = self._generation
        entry = await self._get(self._stations, key)
        if entry is None:
            return None
        info = await self._info(station_spec(entry.value))
        if generation == self._generation:
            self._cache[key] = info
        return info

    async def station_specs(self) -> list[StationSpec]:
        """Every station's settings, by name."""
        specs = []
        with broker_errors():
            try:
                keys = await self._stations.keys()
            except NoKeysError:
                return []
            for key in keys:
                entry = await self._get(self._stations, key)
                if entry is not None and entry.value:
                    specs.append(station_spec(entry.value))
        return sorted(specs, key=lambda spec: spec.name)

    async def partition_states(self, info: StationInfo) -> list[tuple[int, int, int, int]]:
        """(partition, messages, first sequence, last sequence) per partition stream."""
        states = []
        with broker_errors():
            for partition in info.partitions:
                try:
                    state = (await self._js.stream_info(info.stream(partition))).state
                except NotFoundError:
                    states.append((partition, 0, 0, 0))
                    continue
                states.append((partition, state.messages, state.first_seq, state.last_seq))
        return states

    async def _info(self, spec: StationSpec) -> StationInfo:
        schema = await self.schema_info(spec.schema_name) if spec.schema_name else None
        return StationInfo(
            name=spec.name,
            internal_name=internal_name(spec.name),
            partitions=list(range(1, spec.partitions_number + 1)),
            schema=schema,
            spec=spec,
        )

    async def create_station(self, spec: StationSpec) -> StationInfo:
        """Create the station and its streams; ``AlreadyExists`` if it exists."""
        spec = spec.normalized()
        self.check_station_quota(spec.created_by)
        if spec.schema_name and await self.schema_info(spec.schema_name) is None:
            raise NotFound(f"Schema {spec.schema_name} does not exist")
        key = kv_key(spec.name)
        async with self._locks[key]:
            with broker_errors():
                try:
                    value = dump(asdict(spec) | {"created_at": time.time()})
                    await self._stations.create(key, value)
                    if self.max_stations_per_user:
                        self._count_creator(key, value)  # at once: the bucket's update comes later
                except KeyWrongLastSequenceError:
                    entry = await self._get(self._stations, key)
                    if entry is not None and key not in self._verified:
                        await self._ensure_streams(station_spec(entry.value))  # heals a half-made station
                    raise AlreadyExists(f"Station {spec.name} already exists") from None
                try:
                    await self._ensure_streams(spec)
                except BaseException:
                    await self._delete_streams(spec)
                    await self._stations.delete(key)
                    raise
        log.info("created station %s (%d partitions)", spec.name, spec.partitions_number)
        return await self._info(spec)

    async def ensure_station(self, name: str, created_by: str = "") -> StationInfo:
        """The station, created with the defaults (1 partition, 3600 s, file) if missing."""
        info = await self.station_info(name)
        if info is None:
            try:
                info = await self.create_station(StationSpec(name=name, created_by=created_by))
            except AlreadyExists:
                info = await self.station_info(name)
        if info is None:
            raise NotFound(f"Station {name} does not exist")
        return info

    async def destroy_station(self, name: str) -> bool:
        """Delete the station, its streams and durables; False if there was none."""
        check_name(name, "station")
        key = kv_key(name)
        async with self._locks[key]:
            entry = await self._get(self._stations, key)
            if entry is None:
                return False
            spec = station_spec(entry.value)
            with broker_errors():
                await self._delete_streams(spec)
                await self._stations.delete(key)
            self._cache.pop(key, None)
            self._verified.discard(key)
        log.info("destroyed station %s", spec.name)
        update = {"station_name": spec.name, "type": "remove_station", "update": True}
        await self._push("$memphis_sdk_clients_updates", update)
        return True

    async def _ensure_streams(self, spec: StationSpec) -> None:
        for partition in range(1, spec.partitions_number + 1):
            config = spec.stream_config(partition)
            try:
                await self._js.add_stream(config)
            except APIError as err:
                if err.err_code != STREAM_NAME_IN_USE:
                    raise
                log.info("stream %s exists with another configuration, keeping it", config.name)
        self._verified.add(kv_key(spec.name))

    async def _delete_streams(self, spec: StationSpec) -> None:
        for partition in range(1, spec.partitions_number + 1):
            with contextlib.suppress(NotFoundError):
                await self._js.delete_stream(stream_name(spec.name, partition))

    async def _modify_station(self, name: str, change: Callable[[StationSpec], StationSpec]) -> StationInfo:
        check_name(name, "station")
        key = kv_key(name)
        async with self._locks[key]:
            entry = await self._get(self._stations, key)
            if entry is None:
                raise NotFound(f"Station {name} does not exist")
            spec = change(station_spec(entry.value))
            with broker_errors():
                try:
                    await self._stations.update(key, dump(asdict(spec)), last=entry.revision)
                except KeyWrongLastSequenceError:
                    raise GatewayError("station changed concurrently, retry", code=grpc.StatusCode.ABORTED) from None
            self._cache.pop(key, None)
        return await self._info(spec)

    # Consumer groups

    async def ensure_consumer_group(self, station: str, group: GroupSpec, created_by: str = "") -> StationInfo:
        """Create the group's durable on every partition stream if missing (the station too).

        An existing durable is kept as it is: its position is the group's position.
        """
        check_name(group.name, "consumer group")
        info = await self.ensure_station(station, created_by)
        durable = internal_name(group.name)
        with broker_errors():
            for partition in info.partitions:
                stream = info.stream(partition)
                if await self._durable_exists(stream, durable):
                    continue
                try:
                    state = (await self._js.stream_info(stream)).state
                except NotFoundError:
                    await self._ensure_streams(info.spec)
                    state = (await self._js.stream_info(stream)).state
                try:
                    await self._js.add_consumer(stream, group.consumer_config(stream, state.last_seq))
                except APIError:
                    if not await self._durable_exists(stream, durable):  # else: a concurrent creation won
                        raise
        return info

    async def _durable_exists(self, stream: str, durable: str) -> bool:
        try:
            await self._js.consumer_info(stream, durable)
        except NotFoundError:
            return False
        return True

    # Schemas

    async def stations_using(self, schema_name: str) -> list[str]:
        """The stations enforcing the schema, by name."""
        return [spec.name for spec in await self.station_specs() if spec.schema_name == schema_name.lower()]

    async def _push_to_stations_using(self, schema: SchemaInfo) -> None:
        for station in await self.stations_using(schema.name):
            await self._push_schema(station, 1, schema.schema_update())

