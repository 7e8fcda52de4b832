"""The gateway's lifecycle: broker, control plane, servicers, gRPC and REST listeners.

Start-up runs in order and stop in reverse: the embedded nats-server (when no
broker is configured), the control-plane connection and responder, the broker
adapter, then both listeners. ``stop()`` stops accepting, drains calls in
flight up to the drain timeout, and closes everything it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import nats
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from gateway.calls import Endpoint, build_endpoints
from gateway.contract import SERVICES
from gateway.controlplane import ControlPlane
from gateway.embedded import EmbeddedBroker
from gateway.grpc_server import build_grpc_server
from gateway.guard import Guard
from gateway.memphis_adapter import MemphisBroker
from gateway.rest import RestOptions, build_rest_app
from gateway.servicers.auth import AuthService
from gateway.servicers.consume import ConsumeService
from gateway.servicers.monitoring import MonitoringService
from gateway.servicers.produce import ProduceService
from gateway.settings import Settings
from gateway.tokens import TokenService

log = logging.getLogger("gateway")
HEALTH_INTERVAL_S = 2.0


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    grpc: int
    broker_url: str


class Gateway:
    def __init__(self, settings: Settings) -> None:
        if not settings.jwt_secret:
            raise ValueError("jwt_secret must be set (the CLI generates one)")
        self.settings = settings
        self.embedded: EmbeddedBroker | None = None
        self.service_nc: Any = None
        self.control_plane: ControlPlane | None = None
        self.broker: MemphisBroker | None = None
        self.endpoints: list[Endpoint] = []
        self._grpc: Any = None
        self._runner: web.AppRunner | None = None
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self.ports: Ports | None = None

    async def start(self) -> Ports:
        s = self.settings
        broker_url = s.broker_url
        if s.embedded:
            self.embedded = EmbeddedBroker(
                data_dir=s.data_dir, port=s.broker_port, root_user=s.root_user, root_password=s.root_password
            )
            await self.embedded.start()
            broker_url = self.embedded.url
            log.info("broker: embedded nats-server pid %s at %s, data in %s (root user %r)",
                     self.embedded.pid, broker_url, s.data_dir.resolve(), s.root_user)
        else:
            log.info("broker: external %s at %s", "NATS JetStream" if s.control_plane else "Memphis", broker_url)
        if s.answers_control_plane:
            self.service_nc = await nats.connect(
                broker_url,
                user=f"{s.root_user}$1",
                password=s.root_password,
                name="memphis-gateway::control-plane",
                connect_timeout=s.broker_timeout_s,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=_quiet_error,
            )
            self.control_plane = ControlPlane()
            await self.control_plane.start(self.service_nc)
            log.info("control plane: answering Memphis's $memphis_* requests")
        self.broker = MemphisBroker(
            broker_url, timeout_s=s.broker_timeout_s, idle_s=s.session_idle_s, service_nc=self.service_nc
        )
        tokens = TokenService(s.jwt_secret)
        servicers = [
            AuthService(self.broker, tokens, s.token_expiry_min, s.refresh_token_expiry_min),
            ProduceService(self.broker, s.max_batch_messages),
            ConsumeService(self.broker, s.max_consume_batch, s.max_consume_wait_ms),
            MonitoringService(self.broker),
        ]
        self.endpoints = build_endpoints(SERVICES, servicers, Guard(tokens))

        self._grpc = build_grpc_server(self.endpoints, self._health, max_message_bytes=s.max_body_bytes)
        grpc_port = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        await self._grpc.start()

        app = build_rest_app(self.endpoints, self.rest_options())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=s.drain_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.http_port, reuse_port=s.workers > 1)
        await site.start()
        http_port = self._runner.addresses[0][1]

        self._health_task = asyncio.create_task(self._watch_health())
        self.ports = Ports(http=http_port, grpc=grpc_port, broker_url=broker_url)
        log.info("listening: REST http://%s:%d, gRPC %s:%d", s.host, http_port, s.host, grpc_port)
        return self.ports

    def rest_options(self) -> RestOptions:
        s = self.settings
        return RestOptions(
            cors_origins=s.cors_origins, max_body_bytes=s.max_body_bytes, request_timeout_s=s.request_timeout_s
        )

    async def _watch_health(self) -> None:
        assert self.broker is not None
        last: Any = None
        while True:
            reason = await self.broker.health()
            state = health_pb2.HealthCheckResponse.SERVING if reason is None else \
                health_pb2.HealthCheckResponse.NOT_SERVING
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
        drain = self.settings.drain_timeout_s
        if self._health_task is not None:
            self._health_task.cancel()
        await self._health.enter_graceful_shutdown()
        stops = []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace=drain))
        if self._runner is not None:
            stops.append(self._runner.cleanup())
        await asyncio.gather(*stops, return_exceptions=True)
        if self.broker is not None:
            await self.broker.close()
        if self.control_plane is not None:
            with contextlib.suppress(Exception):
                await self.control_plane.stop()
        if self.service_nc is not None:
            with contextlib.suppress(Exception):
                await self.service_nc.close()
        if self.embedded is not None:
            await self.embedded.stop()
        log.info("stopped")


async def _quiet_error(exc: Exception) -> None:
    logging.getLogger("gateway.broker").warning("control-plane connection: %s", exc or type(exc).__name__)
