"""Issue 10, items 4 and 5 and the medium item on station names: text that reaches the NATS protocol.

* An ack id is base64 of the message's reply subject; only spaces were filtered, so tabs and CR/LF
  in a forged one wrote a second protocol line: with nats-py 2.9.0 (allowed by pyproject) one ack
  request deleted another station and the station catalog; with nats-py 2.16 it is a 500.
* An idempotency key (or partition key) with CR/LF, from the query string or the gRPC field,
  wrote an extra message header and passed the ``$memphis`` prefix check.
* A station name with the Kelvin sign (U+212A) was folded to ASCII ``k``.

Run it with the oldest dependencies pyproject allows too: e.g.
``pip install --target /tmp/floor nats-py==2.9.0`` then ``PYTHONPATH=/tmp/floor:$PWD:$PWD/generated pytest ...``
(the gateway subprocess inherits the PYTHONPATH).
"""

from __future__ import annotations

import base64
from typing import Any

import grpc
import nats
import pytest
from memgw.v1 import consume_pb2, produce_pb2

from tests.system.security.conftest import Api, GatewayProcess, bearer, figure, stored_messages, streams_snapshot


def ack_id(subject: str) -> str:
    return base64.urlsafe_b64encode(subject.encode()).decode().rstrip("=")


def unpack(ack: str) -> str:
    body = ack.partition(".")[0]  # an ack id is base64url(reply subject) "." base64url(its HMAC tag)
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def forgeries(real: str, victim_real: str, victim: str) -> dict[str, str]:
    """Ack subjects an attacker sends, built from a real one of the attacker's station."""
    def inject(line: str, sep: str = "\r\n") -> str:
        # "PUB <real>\t0 | | <line>\t0 | | PUB\t<real> 4 | +ACK": three PUBs, the middle one ours, with the
        # empty payload the JetStream API wants
        return f"{real}\t0{sep}{sep}{line}\t0{sep}{sep}PUB\t{real}"
    return {
        "tab": f"{real}\tx",
        "crlf-delete-station": inject(f"PUB\t$JS.API.STREAM.DELETE.{victim}$1"),
        "crlf-delete-catalog": inject("PUB\t$JS.API.STREAM.DELETE.KV_memgw_stations"),
        "lf-purge-station": inject(f"PUB\t$JS.API.STREAM.PURGE.{victim}$1", "\n"),
        "cr-only": f"{real}\r",
        "nul": f"{real}\x00",
        "space": f"{real} x",
        "other-station": victim_real,
        "wildcard": real.rsplit(".", 3)[0] + ".>",
    }


async def explicit_ack_ids(api: Api, station: str, n: int = 1) -> list[str]:
    status, body = await api.consume(station, batch_size=n, wait_ms=2000, ack_mode="ACK_MODE_EXPLICIT")
    assert status == 200 and len(body) == n, (status, body)
    return [m["ack_id"] for m in body]


async def test_forged_ack_ids_are_refused_and_touch_nothing(api: Api, gw: GatewayProcess, nc: nats.NATS,
                                                            station: str) -> None:
    victim = f"{station}-victim"
    js = nc.jetstream()
    for name in (station, victim):
        produced = await api.produce_text(name, "m0")  # creates the station
        assert produced[0] == 200, (name, produced)
        for i in (1, 2):  # the rest straight to the stream: nats-py 2.9.0's gateway fails its 3rd produce
            await js.publish(f"{name}$1.final", f"m{i}".encode())
    [real], [victim_real] = await explicit_ack_ids(api, station), await explicit_ack_ids(api, victim)
    # control: a genuine ack id of this station is accepted (so the refusals below are not vacuous)
    [genuine] = await explicit_ack_ids(api, station)
    status, body, _ = await api.post(f"/stations/{station}/ack", json_body={"ack_ids": [genuine]},
                                     token=await api.token())
    assert status == 200 and body.get("acked") == 1, (status, body)

    before = await streams_snapshot(nc)
    md = bearer(await api.grpc_token())
    outcomes: dict[str, tuple[Any, Any]] = {}
    for label, subject in forgeries(unpack(real), unpack(victim_real), victim).items():
        forged = ack_id(subject)
        status, body, _ = await api.post(f"/stations/{station}/ack", json_body={"ack_ids": [forged]},
                                         token=await api.token())
        rest = status if status != 200 else f"200 acked={body.get('acked')}"
        try:
            reply = await api.consume_rpc.Ack(consume_pb2.AckRequest(station=station, ack_ids=[forged]),
                                              metadata=md)
            grpc_outcome = f"OK acked={reply.acked}"
        except grpc.aio.AioRpcError as exc:
            grpc_outcome = exc.code().name
        outcomes[label] = (rest, grpc_outcome)
    after = await streams_snapshot(nc)
    still, _ = await api.consume(station, batch_size=1, wait_ms=200)
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    figure("ack-injection", f"{ {k: f'{r}/{g}' for k, (r, g) in outcomes.items()} }; streams changed: {changed}; "
           f"consume after: {still}", outcomes={k: [str(r), g] for k, (r, g) in outcomes.items()},
           changed={k: list(v) for k, v in changed.items()})
    assert not changed, changed
    for label, (rest, grpc_outcome) in outcomes.items():
        assert rest in (400, "200 acked=0"), (label, rest)
        assert grpc_outcome in ("INVALID_ARGUMENT", "OK acked=0"), (label, grpc_outcome)
    assert still == 200


INJECTED = "k1\r\nX-Injected: yes"
MEMPHIS_INJECTED = "k2\r\n$memphis_producedBy: evil"


def injected(msgs: list[Any]) -> int:
    return sum(1 for m in msgs if "X-Injected" in (m.headers or {})
               or (m.headers or {}).get("$memphis_producedBy") == "evil")


@pytest.mark.parametrize("field", ["idempotency_key", "partition_key"])
async def test_rest_query_key_with_crlf_is_refused(api: Api, gw: GatewayProcess, nc: nats.NATS, station: str,
                                                   field: str) -> None:
    await api.produce_text(station, "exists")
    statuses = [(await api.produce_text(station, "evil", params={field: value}))[0]
                for value in (INJECTED, MEMPHIS_INJECTED)]
    stored = injected(await stored_messages(nc, station))
    figure(f"crlf-query-{field}", f"statuses {statuses}; messages stored with an injected header: {stored}",
           statuses=statuses, stored=stored)
    assert statuses == [400, 400]
    assert stored == 0


@pytest.mark.parametrize("where", ["single-idempotency", "single-partition", "batch-idempotency",
                                   "batch-partition", "headers-map-idempotency"])
async def test_grpc_key_with_crlf_is_refused(api: Api, gw: GatewayProcess, nc: nats.NATS, station: str,
                                             where: str) -> None:
    """``headers-map-idempotency`` is already refused today (header values are checked): a guard."""
    await api.produce_text(station, "exists")
    md = bearer(await api.grpc_token())
    codes = []
    for value in (INJECTED, MEMPHIS_INJECTED):
        if where.startswith("single"):
            key = "idempotency_key" if where.endswith("idempotency") else "partition_key"
            call = api.produce_rpc.ProduceSingle(produce_pb2.ProduceSingleRequest(
                station=station, body={"content_type": "text/plain", "data": b"evil"}, **{key: value}), metadata=md)
        elif where.startswith("batch"):
            key = "idempotency_key" if where.endswith("idempotency") else "partition_key"
            call = api.produce_rpc.ProduceBatch(produce_pb2.ProduceBatchRequest(
                station=station, messages=[produce_pb2.ProducedMessage(data=b"evil", **{key: value})]), metadata=md)
        else:
            call = api.produce_rpc.ProduceSingle(produce_pb2.ProduceSingleRequest(
                station=station, body={"content_type": "text/plain", "data": b"evil"},
                headers={"Idempotency-Key": value}), metadata=md)
        try:
            await call
            codes.append("OK")
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code().name)
    stored = injected(await stored_messages(nc, station))
    figure(f"crlf-grpc-{where}", f"codes {codes}; messages stored with an injected header: {stored}",
           codes=codes, stored=stored)
    assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert stored == 0


async def test_non_ascii_station_names_are_refused(api: Api, gw: GatewayProcess, nc: nats.NATS) -> None:
    kelvin = "\u212aelvin-station"  # folds to "kelvin-station"
    token = await api.token()
    status, body, _ = await api.post(f"/stations/{kelvin}/produce/single", data="evil", token=token,
                                     headers={"Content-Type": "text/plain"})
    md = bearer(await api.grpc_token())
    try:
        await api.produce_rpc.ProduceSingle(produce_pb2.ProduceSingleRequest(
            station=kelvin, body={"content_type": "text/plain", "data": b"evil"}), metadata=md)
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    streams = await streams_snapshot(nc)
    folded = [name for name in streams if name.startswith("kelvin-station")]
    figure("station-kelvin", f"REST {status} {str(body)[:60]!r}, gRPC {code}; streams created: {folded}",
           rest=status, grpc=code, created=folded)
    assert status == 400
    assert code == "INVALID_ARGUMENT"
    assert not folded
