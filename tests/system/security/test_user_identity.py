"""Issue 10, item 7: per-user limits bypassed with ``user$N``.

memphis-py tries ``root$N`` and falls back to the bare ``root``, so tokens for ``root$2`` ...
``root$7`` are all the broker's user ``root``; each got a fresh rate limit and stream quota, and
every login a broker connection of its own (3000 logins: 3000 connections). The username
``root$99999999999999999999`` was a 500. Limits and sessions must be keyed by the broker identity,
and the sessions of one user bounded.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from memgw.v1 import auth_pb2, consume_pb2

from tests.system.security.conftest import ROOT_PASSWORD, Api, GatewayProcess, bearer, figure

RPS = 5
MAX_STREAMS = 2
GATEWAY_ARGS = ["--rate-limit-rps", str(RPS), "--max-streams-per-user", str(MAX_STREAMS)]
VARIANTS = [f"root${n}" for n in range(2, 8)]
SESSIONS_BOUND = 10  # broker connections one user's logins may add


async def allowed_in(api: Api, tokens: list[str], station: str, seconds: float = 3.0, per_s: float = 80) -> int:
    """Produces answered (not 429) while sending ``per_s`` requests/s round-robin over ``tokens``."""
    ok = 0

    async def one(token: str) -> None:
        nonlocal ok
        status, _, _ = await api.post(f"/stations/{station}/produce/single", data="x", token=token,
                                      headers={"Content-Type": "text/plain"})
        ok += status != 429

    tasks = []
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        tasks.append(asyncio.create_task(one(tokens[i % len(tokens)])))
        i += 1
        await asyncio.sleep(1 / per_s)
    await asyncio.gather(*tasks)
    return ok


async def test_user_variants_share_one_rate_limit(api: Api, gw: GatewayProcess, station: str) -> None:
    tokens = [await api.token(u) for u in VARIANTS]
    await asyncio.sleep(1.5)  # the logins' buckets refill
    single = await allowed_in(api, tokens[:1], station)
    await asyncio.sleep(2.5)
    combined = await allowed_in(api, tokens, station)
    figure("user-variants-rate", f"--rate-limit-rps {RPS}, 3 s at 80 req/s: one token {single} answered, "
           f"{len(tokens)} tokens of root$2..root$7 {combined} answered ({combined / max(single, 1):.1f}x)",
           single=single, combined=combined)
    assert single <= RPS * 3 + RPS * 2  # the limit is on at all
    assert combined <= single * 1.5 + 2, (single, combined)


async def test_user_variants_share_one_stream_quota(api: Api, gw: GatewayProcess, station: str) -> None:
    await asyncio.sleep(1.5)  # the rate test before this one emptied root's request bucket (--rate-limit-rps): refill
    await api.produce_text(station, "exists")
    calls = []
    outcomes = []
    try:
        for user in ["root$2", "root$2", "root$3", "root$4"]:
            md = bearer(await api.grpc_token(user))
            request = consume_pb2.SubscribeRequest(station=station, consumer_name=f"s{len(calls)}")
            call = api.consume_rpc.Subscribe(request, metadata=md)
            calls.append(call)
            read = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({read}, timeout=1.5)
            if not done:
                outcomes.append((user, "running"))
                continue
            try:
                read.result()
                outcomes.append((user, "running"))
            except grpc.aio.AioRpcError as exc:
                outcomes.append((user, exc.code().name))
    finally:
        for call in calls:
            call.cancel()
    figure("user-variants-streams", f"--max-streams-per-user {MAX_STREAMS}: {outcomes}", outcomes=outcomes)
    assert [o for _, o in outcomes[:MAX_STREAMS]] == ["running"] * MAX_STREAMS
    assert all(o == "RESOURCE_EXHAUSTED" for _, o in outcomes[MAX_STREAMS:]), outcomes


async def test_huge_account_number_is_a_4xx(api: Api, gw: GatewayProcess) -> None:
    name = "root$99999999999999999999"
    status, body, _ = await api.post("/auth/authenticate", json_body={"username": name, "password": ROOT_PASSWORD})
    try:
        await api.auth_rpc.Authenticate(auth_pb2.AuthenticateRequest(username=name, password=ROOT_PASSWORD))
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    figure("user-huge-account", f"REST {status} {str(body)[:60]!r}, gRPC {code}", rest=status, grpc=code)
    assert status in (400, 401)
    assert code in ("INVALID_ARGUMENT", "UNAUTHENTICATED")


async def test_logins_of_one_user_open_bounded_broker_connections(api: Api, gw: GatewayProcess,
                                                                   broker: object) -> None:
    port = int(str(broker.url).rsplit(":", 1)[1])  # type: ignore[attr-defined]
    before = gw.tcp(remote_port=port)
    statuses: dict[int, int] = {}
    for n in range(100, 200):
        status, _, _ = await api.post("/auth/authenticate",
                                      json_body={"username": f"root${n}", "password": ROOT_PASSWORD})
        statuses[status] = statuses.get(status, 0) + 1
    after = gw.tcp(remote_port=port)
    for _ in range(50):  # connections the logins probed with may still be closing on a loaded machine
        if after - before <= SESSIONS_BOUND:
            break
        await asyncio.sleep(0.1)
        after = gw.tcp(remote_port=port)
    figure("user-variants-sessions", f"100 logins as root$100..root$199: answers {statuses}, broker connections "
           f"{before} -> {after}", before=before, after=after, answers=statuses)
    assert after - before <= SESSIONS_BOUND
