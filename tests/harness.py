"""Helpers for integration tests: a gateway on real loopback sockets, and clients for both protocols."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from memgw.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    consume_pb2_grpc,
    monitoring_pb2_grpc,
    produce_pb2_grpc,
)

from gateway.app import Gateway
from gateway.settings import Settings
from tests.conftest import ROOT_PASSWORD, ROOT_USER

JWT_SECRET = "test-secret-" + "x" * 40


def settings_for(broker_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker": broker_url,
        "control_plane": True,
        "http_port": 0,
        "grpc_port": 0,
        "root_user": ROOT_USER,
        "root_password": ROOT_PASSWORD,
        "jwt_secret": JWT_SECRET,
        "data_dir": data_dir,
        "broker_timeout_s": 3.0,
        **overrides,
    }
    return Settings(**values)


@dataclass
class Clients:
    """REST and gRPC clients of one running gateway."""

    gateway: Gateway
    http: aiohttp.ClientSession
    channel: grpc.aio.Channel
    base: str

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def produce(self) -> produce_pb2_grpc.ProduceServiceStub:
        return produce_pb2_grpc.ProduceServiceStub(self.channel)

    @property
    def consume(self) -> consume_pb2_grpc.ConsumeServiceStub:
        return consume_pb2_grpc.ConsumeServiceStub(self.channel)

    @property
    def monitoring(self) -> monitoring_pb2_grpc.MonitoringServiceStub:
        return monitoring_pb2_grpc.MonitoringServiceStub(self.channel)

    async def post(self, path: str, body: Any = None, *, token: str | None = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if raw is None and body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        async with self.http.post(self.base + path, data=data, headers=hdrs) as resp:
            text = await resp.read()
            return resp.status, _json(text), resp.headers

    async def get(self, path: str, *, token: str | None = None) -> tuple[int, Any, Any]:
        hdrs = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(self.base + path, headers=hdrs) as resp:
            return resp.status, _json(await resp.read()), resp.headers

    async def rest_token(self) -> str:
        status, body, _ = await self.post("/auth/authenticate", {"username": ROOT_USER, "password": ROOT_PASSWORD})
        assert status == 200, body
        return str(body["jwt"])

    async def grpc_token(self) -> str:
        reply = await self.auth.Authenticate(auth_pb2.AuthenticateRequest(username=ROOT_USER, password=ROOT_PASSWORD))
        return reply.jwt


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def is_unauthorized(body: Any) -> bool:
    """The upstream's 401 body ``{"message": "Unauthorized"}``, plus (ours) the ``reason`` it was refused."""
    return isinstance(body, dict) and body.get("message") == "Unauthorized" and set(body) <= {"message", "reason"} \
        and bool(body.get("reason"))


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def jwt_payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[Clients]:
    gateway = Gateway(settings)
    ports = await gateway.start()
    try:
        async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            yield Clients(gateway=gateway, http=http, channel=channel, base=f"http://127.0.0.1:{ports.http}")
    finally:
        await gateway.stop()
