"""The per-user station quota (``--max-stations-per-user``): a user who produces (or consumes) into
ever new stations is refused (429 / RESOURCE_EXHAUSTED) once they made as many as the quota; an SDK
client is bounded the same way by the control plane. Its own module: its own nats-server, so no
other gateway's control plane answers in its place."""

from __future__ import annotations

import uuid

import grpc
import pytest
from memgw.v1 import produce_pb2

from tests.harness import ROOT_USER, bearer, running_gateway, settings_for
from tests.integration.test_station_lifecycle import TEXT, sdk_client


async def test_station_quota_per_user(nats_server, tmp_path) -> None:
    settings = settings_for(nats_server.url, tmp_path, max_stations_per_user=3)
    async with running_gateway(settings) as gw:
        catalog = gw.gateway.control_plane.catalog
        already = catalog._per_creator[ROOT_USER]
        assert already == 0
        token = await gw.rest_token()
        names = [f"quota-{uuid.uuid4().hex[:8]}" for _ in range(5)]
        statuses = []
        for name in names[:4]:
            status, body, _ = await gw.post(f"/stations/{name}/produce/single", raw=b"x", token=token, headers=TEXT)
            statuses.append(status)
        print(f"\nquota {already + 3} stations ({already} made before): produce into 4 new stations -> {statuses}; "
              f"last: {body}")
        assert statuses == [200, 200, 200, 429]
        assert "station quota reached" in str(body)
        err = None
        try:
            await gw.produce.ProduceSingle(produce_pb2.ProduceSingleRequest(
                station=names[4], body={"content_type": "text/plain", "data": b"x"}), metadata=bearer(token))
        except grpc.aio.AioRpcError as exc:
            err = exc
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "max_stations_per_user" in err.details()
        # existing stations keep working
        status, _, _ = await gw.post(f"/stations/{names[0]}/produce/single", raw=b"y", token=token, headers=TEXT)
        assert status == 200
        # an SDK client is bounded the same way
        m = await sdk_client(nats_server)
        try:
            with pytest.raises(Exception, match="station quota reached"):
                await m.producer(station_name=names[4], producer_name="p", timeout_retries=0)
        finally:
            await m.close()
