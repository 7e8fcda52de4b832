"""MonitoringService: a truthful status and this replica's resource figures."""

from __future__ import annotations

import psutil
from memgw.v1 import monitoring_pb2

from gateway.broker.seam import Broker
from gateway.core.errors import Unavailable
from gateway.rpc.call import CallContext


class MonitoringService:
    SERVICE = "memgw.v1.MonitoringService"

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # starts the CPU measurement window

    async def Status(self, request: monitoring_pb2.StatusRequest, ctx: CallContext) -> monitoring_pb2.StatusResponse:
        reason = await self._broker.health()
        if reason is not None:
            raise Unavailable(reason, detail=monitoring_pb2.StatusResponse(status="unavailable", reason=reason))
        return monitoring_pb2.StatusResponse(status="ok")

    async def GetResourcesUtilization(
        self, request: monitoring_pb2.GetResourcesUtilizationRequest, ctx: CallContext
    ) -> monitoring_pb2.GetResourcesUtilizationResponse:
        principal = ctx.principal  # None when public (DEV_ENV=true): storage 0, as upstream answers
        return monitoring_pb2.GetResourcesUtilizationResponse(
            cpu=round(self._process.cpu_percent(None), 2),
            memory=round(self._process.memory_percent(), 2),
            storage=await self._broker.storage_bytes(principal.credentials) if principal is not None else 0,
        )
