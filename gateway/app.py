"""The gateway's lifecycle: broker, control plane, servicers, gRPC and REST listeners.

Start-up runs in order and stop in reverse: the embedded nats-server (when no
broker is configured), the control-plane connection and responder, the broker
adapter, then both listeners. ``stop()`` stops accepting, drains calls in
flight up to the drain timeout, and closes everything it opened.

Stop, step by step (SIGTERM; ``python -m gateway`` exits at once on a second one):

1. health NOT_SERVING; streaming consumes end after their current fetch (<= 1 s);
2. both listeners stop accepting and drain *concurrently*: REST requests and gRPC
   calls in flight get up to ``drain_timeout_s``, then are cancelled;
3. broker sessions, the control plane and its connection close, each bounded;
4. the embedded nats-server gets SIGTERM (its store stays consistent).

Slow and idle HTTP clients: a connection idle for ``http_keepalive_s`` (also before
its first request, and while a client trickles a request's headers) is closed by aiohttp; a
body not all received within ``body_read_timeout_s`` is 408 and its connection closed; one
whose response makes no progress for ``http_send_timeout_s`` (a client that stopped reading) is aborted, which frees the
response buffered for it. Idle gRPC connections close after ``grpc_idle_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import nats
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from gateway.auth.directory import Directory
from gateway.auth.guard import Guard
from gateway.auth.throttle import LoginThrottle
from gateway.auth.tokens import TokenService, choose
from gateway.broker.adapter import MemphisBroker
from gateway.broker.natsutil import parse_servers, tls_context
from gateway.broker_setup import connect_service, control_password, embedded_broker, users_applier
from gateway.core.deadlines import timeout
from gateway.core.identity import Credentials
from gateway.core.keys import derive_key
from gateway.embedded.catalog import Catalog
from gateway.embedded.controlplane import CONTROL_USER, ControlPlane
from gateway.embedded.server import EmbeddedBroker
from gateway.management import management_servicers
from gateway.pages import docs_routes, live_route, metrics_route, root_route
from gateway.rpc.call import Endpoint, build_endpoints
from gateway.rpc.contract import SERVICES
from gateway.rpc.grpc_server import build_grpc_server
from gateway.rpc.metrics import Metrics
from gateway.rpc.metrics_share import MetricsShare
from gateway.servicers.access import ApiKeyService, UserService
from gateway.servicers.auth import AuthService
from gateway.servicers.consume import ConsumeService
from gateway.servicers.monitoring import MonitoringService
from gateway.servicers.produce import ProduceService
from gateway.settings import Settings, worker_group
from gateway.transcoding.openapi import openapi_route
from gateway.transcoding.server import RestOptions, abort_stalled_sends, build_rest_handler, rest_runner

log = logging.getLogger("gateway")
HEALTH_INTERVAL_S = 2.0
# After answering a request whose body it did not read (401, 408, 413, 503), aiohttp reads and drops
# what the client still sends for this long, so that the client sees the answer, then closes (its
# default of 10 s let a refused client hold its connection that long).
LINGER_S = 2.0
LISTEN_BACKLOG = 4096  # pending connections the kernel queues (aiohttp: 128, which drops bursts of connects)
CLOSE_BUDGET_S = 1.5  # after the drain: broker sessions, control plane, its connection (a third each)
DEV_ENV_PUBLIC = "/memgw.v1.MonitoringService/GetResourcesUtilization"  # upstream's DEV_ENV route, no token
STOP_MARGIN_S = 1.9  # the whole stop takes at most drain_timeout_s + this (8 + 1.9 s by default)


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    grpc: int
    broker_url: str


class PortInUse(RuntimeError):
    """A listener's port cannot be bound; the message names the flag that changes it."""


class Gateway:
    def __init__(self, settings: Settings) -> None:
        if not settings.jwt_secret:
            raise ValueError("jwt_secret must be set (the CLI generates one)")
        self.settings = settings
        self.embedded: EmbeddedBroker | None = None
        self.service_nc: Any = None
        self.requests_nc: Any = None  # CONTROL_USER's connection: the $memphis_* requests, sender named
        self.control_plane: ControlPlane | None = None
        self.broker: MemphisBroker | None = None
        self.directory: Directory | None = None
        self.endpoints: list[Endpoint] = []
        self._grpc: Any = None
        self._runner: web.ServerRunner | None = None
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._send_task: asyncio.Task[None] | None = None
        self.ports: Ports | None = None
        self.metrics = Metrics()
        self.metrics_share: MetricsShare | None = None  # --workers: one scrape sums every worker

    async def start(self) -> Ports:
        s = self.settings
        broker_url = s.broker_url
        if s.embedded:
            self.embedded = embedded_broker(s)
            await self.embedded.start()
            broker_url = self.embedded.url
            log.info("broker: embedded nats-server pid %s at %s, data in %s (root user %r)",
                     self.embedded.pid, broker_url, s.data_dir.resolve(), s.root_user)
        else:
            log.info("broker: external %s at %s", "NATS JetStream" if s.control_plane else "Memphis", broker_url)
        group = worker_group()
        if s.answers_control_plane or (s.workers > 1 and group):
            self.service_nc = await connect_service(s, broker_url)
        if s.workers > 1 and group:
            self.metrics_share = MetricsShare(self.metrics, self.service_nc, group, s.workers)
            await self.metrics_share.start()
        if s.answers_control_plane:
            replicas = min(3, len(self.service_nc.servers))  # known + discovered cluster members
            catalog = Catalog(kv_replicas=replicas)
            catalog.max_stations_per_user = s.max_stations_per_user
            self.control_plane = ControlPlane(catalog=catalog, drain_s=CLOSE_BUDGET_S / 4)
            log.info("control plane: catalog replicas: %d", replicas)
        self.broker = MemphisBroker(
            broker_url, timeout_s=s.broker_timeout_s, idle_s=s.session_idle_s,
            ack_key=derive_key(s.jwt_secret, "ack-id"), service_nc=self.service_nc, tls=s.broker_tls,
            max_inflight_produce_bytes=s.max_inflight_produce_bytes,
        )
        root_password, root_token = choose(s.auth_mode, s.root_password, s.connection_token)
        tokens = TokenService(
            s.jwt_secret,
            upstream_secret=s.upstream_jwt_secret,
            upstream_refresh_secret=s.upstream_refresh_jwt_secret,
            root=Credentials(username=s.root_user, account_id=1, password=root_password, connection_token=root_token),
            mode=s.auth_mode,
        )
        self.directory = Directory(tokens, s.root_user, managed=s.answers_control_plane)
        if self.embedded is not None:
            self.directory.broker_sync = users_applier(self.embedded)
        if self.service_nc is not None:
            await self.directory.open(self.service_nc, replicas=min(3, len(self.service_nc.servers)))
            await self.directory.sync_broker()
        if self.control_plane is not None:
            await self._start_control_plane(broker_url)
        servicers = [
            AuthService(self.broker, tokens, s.token_expiry_min, s.refresh_token_expiry_min,
                        LoginThrottle(s.login_failures_per_user_per_min, s.login_failures_per_address_per_min),
                        max_min=s.max_token_expiry_min, mode=s.auth_mode),
            ProduceService(self.broker, s.max_batch_messages),
            ConsumeService(self.broker, s.max_consume_batch, s.max_consume_wait_ms, s.max_consume_bytes,
                           s.max_body_bytes),
            MonitoringService(self.broker),
            UserService(self.directory),
            ApiKeyService(self.directory),
            *management_servicers(self.control_plane.catalog if self.control_plane else None,
                                  self.control_plane.dead_letters if self.control_plane else None),
        ]
        guard = Guard(
            tokens,
            self.directory,
            max_streams_per_principal=s.max_streams_per_user,
            requests_per_s=s.rate_limit_rps,
            bytes_per_s=s.rate_limit_bytes_per_s,
            also_public=frozenset({DEV_ENV_PUBLIC} if s.dev_env else ()),
        )
        self.endpoints = build_endpoints(SERVICES, servicers, guard, observer=self.metrics)

        self._grpc = build_grpc_server(
            self.endpoints, self._health, max_message_bytes=s.max_body_bytes, idle_s=s.grpc_idle_s,
            reuse_port=s.workers > 1,
            max_streams=s.grpc_max_streams, max_age_s=s.grpc_max_connection_age_s,
        )
        try:
            grpc_port = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except RuntimeError as exc:
            raise PortInUse(f"gRPC port {s.host}:{s.grpc_port} cannot be bound ({exc}): another program "
                            "uses it? choose another with --grpc-port (MEMPHIS_GATEWAY_GRPC_PORT)") from None
        await self._grpc.start()

        handler = build_rest_handler(self.endpoints, self.rest_options())
        # aiohttp waits shutdown_timeout for handlers, then (after cancelling only their body
        # reads) up to shutdown_timeout again before cancelling them: half the drain each.
        self._runner = rest_runner(handler, shutdown_timeout=s.drain_timeout_s / 2,
                                   keepalive_timeout=s.http_keepalive_s, lingering_time=LINGER_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.http_port, reuse_port=s.workers > 1,
                           backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise PortInUse(f"REST port {s.host}:{s.http_port} cannot be bound ({exc.strerror}): another "
                            "program uses it? choose another with --http-port (MEMPHIS_GATEWAY_HTTP_PORT, "
                            "or HTTP_PORT)") from None
        http_port = self._runner.addresses[0][1]

        self._health_task = asyncio.create_task(self._watch_health())
        self._send_task = asyncio.create_task(abort_stalled_sends(self._runner, s.http_send_timeout_s))
        self.ports = Ports(http=http_port, grpc=grpc_port, broker_url=broker_url)
        log.info("listening: REST http://%s:%d, gRPC %s:%d", s.host, http_port, s.host, grpc_port)
        return self.ports

    async def _start_control_plane(self, broker_url: str) -> None:
        """Answer the $memphis_* requests with the requester's rights (controlplane.py, "Who asks"):
        verified through the control account when the broker has it, else the payload's claim."""
        s, plane, directory = self.settings, self.control_plane, self.directory
        assert plane is not None and directory is not None
        mode = "trusted (connection-token mode: every client holds root's token)"
        if s.auth_mode != "token":
            plane.rights = directory.broker_user_access
            self.requests_nc = await self._connect_requests(broker_url)
            plane.verified = self.requests_nc is not None
            mode = "verified (nats-server names each requester)" if plane.verified else (
                "claimed (the payload's username, which a client can forge: give the broker the control "
                "account of docs/memphis-py.md to verify requesters)")
        await plane.start(self.service_nc, requests_nc=self.requests_nc)
        log.info("control plane: answering Memphis's $memphis_* requests; requesters: %s", mode)

    async def _connect_requests(self, broker_url: str) -> Any:
        """CONTROL_USER's connection, or None if the broker has no control account (an external broker)."""
        credentials = {"user": CONTROL_USER, "password": control_password(self.settings)}
        if self.embedded is None:
            scheme = "tls" if self.settings.broker_tls else "nats"
            servers = [f"{scheme}://{host}:{port}" for host, port in parse_servers(broker_url)]
            try:  # a probe: the connection below would retry an authorization failure forever
                probe = await nats.connect(servers, **credentials, tls=tls_context(self.settings.broker_tls),
                                           allow_reconnect=False, max_reconnect_attempts=0,
                                           connect_timeout=self.settings.broker_timeout_s)
            except Exception as exc:
                log.info("control plane: no control account on the broker (%s)", exc or type(exc).__name__)
                return None
            await probe.close()
        return await connect_service(self.settings, broker_url, credentials, name="memphis-gateway::control-requests")

    def rest_options(self) -> RestOptions:
        s = self.settings
        return RestOptions(
            cors_origins=s.cors_origins,
            max_body_bytes=s.max_body_bytes,
            request_timeout_s=s.request_timeout_s,
            body_read_timeout_s=s.body_read_timeout_s,
            max_inflight_body_bytes=s.max_inflight_body_bytes,
            extra_routes=(
                metrics_route(self.metrics, self.metrics_share.gather if self.metrics_share else None),
                root_route(),
                live_route(),
                *docs_routes(),
                openapi_route(self.endpoints),
            ),
        )

    async def _watch_health(self) -> None:
        assert self.broker is not None
        last: Any = None
        while True:
            reason = await self.broker.health()
            state = health_pb2.HealthCheckResponse.SERVING if reason is None else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            self.metrics.broker_up.set(1 if reason is None else 0)
            if state != last:
                await self._health.set("", state)
                for service in SERVICES:
                    await self._health.set(service.full_name, state)
                if reason is not None:
                    log.warning("broker unavailable: %s", reason)
                elif last is not None:
                    log.info("broker available again")
                last = state
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def stop(self) -> None:
        """Stop accepting, drain calls in flight (bounded), close everything in reverse order."""
        started = time.monotonic()
        drain = self.settings.drain_timeout_s
        for task in (self._health_task, self._send_task):
            if task is not None:
                task.cancel()
        await self._health.enter_graceful_shutdown()
        if self.broker is not None:
            self.broker.begin_drain()  # streams end; unary calls finish
        stops = []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace=drain))
        if self._runner is not None:
            stops.append(self._runner.cleanup())
        await asyncio.gather(*stops, return_exceptions=True)
        drained = time.monotonic() - started
        if self.broker is not None:
            await self.broker.close(timeout_s=CLOSE_BUDGET_S / 3)
        if self.metrics_share is not None:
            await self.metrics_share.stop()
        if self.directory is not None:
            await self.directory.close()
        if self.control_plane is not None:
            with contextlib.suppress(Exception):
                async with timeout(CLOSE_BUDGET_S / 3):
                    await self.control_plane.stop()
        for nc in (self.requests_nc, self.service_nc):
            if nc is not None:
                with contextlib.suppress(Exception):
                    async with timeout(CLOSE_BUDGET_S / 3):
                        await nc.close()
        if self.embedded is not None:
            # SIGTERM, then SIGKILL once the stop budget is spent (JetStream survives a kill -9)
            self.embedded.stop_timeout = max(0.5, drain + STOP_MARGIN_S - (time.monotonic() - started))
            await self.embedded.stop()
        log.info("stopped (drain %.2f s, total %.2f s)", drained, time.monotonic() - started)
