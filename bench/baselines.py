"""The limits the gateway is measured against, each in its own (pinnable) process.

    python bench/baselines.py rest    --url NATS --port P      # B: minimal aiohttp produce handler
    python bench/baselines.py grpc    --url NATS --port P      # C: minimal grpc.aio unary produce handler
    python bench/baselines.py publish --url NATS --duration S  # A: raw nats-py publish_async windows
    python bench/baselines.py fetch   --url NATS --durable D   # D: raw nats-py pull fetch(100) + ack

B and C print ``READY <port>`` once listening and serve until SIGTERM; B serves the gateway's
path ``POST /stations/{station}/produce/single`` and C the gateway's gRPC method
``memgw.v1.ProduceService/ProduceSingle``, so the load generator sends them the very requests
it sends the gateway. A and D print one JSON line with their figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from bench.common import DRAIN_STREAM, HOST, RAW_STREAM, connect, payload

OK_BODY = b'{"error":null,"success":true}'


def _run(main: Any) -> None:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:  # pragma: no cover
        asyncio.run(main)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- B: minimal aiohttp ----------------------------------------------------------


async def serve_rest(url: str, port: int, subject: str) -> None:
    from aiohttp import web

    nc = await connect(url)
    js = nc.jetstream()

    async def produce(request: web.Request) -> web.Response:
        body = await request.read()
        await js.publish(subject, body, timeout=5)
        return web.Response(body=OK_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/stations/{station}/produce/single", produce)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    print(f"READY {port}", flush=True)
    await _until_signal()
    await runner.cleanup()
    await nc.close()


# -- C: minimal grpc.aio -----------------------------------------------------------


async def serve_grpc(url: str, port: int, subject: str) -> None:
    import grpc
    from memgw.v1 import produce_pb2

    nc = await connect(url)
    js = nc.jetstream()
    ok = produce_pb2.ProduceSingleResponse(success=True)

    async def produce_single(request: Any, _context: Any) -> Any:
        await js.publish(subject, request.body.data, timeout=5)
        return ok

    handler = grpc.unary_unary_rpc_method_handler(
        produce_single,
        request_deserializer=produce_pb2.ProduceSingleRequest.FromString,
        response_serializer=produce_pb2.ProduceSingleResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("memgw.v1.ProduceService", {"ProduceSingle": handler})]
    )
    bound = server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    print(f"READY {bound}", flush=True)
    await _until_signal()
    await server.stop(1)
    await nc.close()


# -- A: raw publish_async windows ----------------------------------------------------


async def publish(url: str, subject: str, duration: float, window: int, size: int) -> dict[str, Any]:
    """Publish for ``duration`` seconds with up to ``window`` unacknowledged; count the acks."""
    nc = await connect(url, pending_size=8 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=window)
    body = payload(size)
    acked = failed = 0

    def done(f: asyncio.Future[Any]) -> None:
        nonlocal acked, failed
        if f.cancelled() or f.exception() is not None:
            failed += 1
        else:
            acked += 1

    await (await js.publish_async(subject, body))  # sets up the reply subscription
    acked = 0
    c0, t0 = time.process_time(), time.monotonic()
    end = t0 + duration
    sent = 0
    while time.monotonic() < end:
        for _ in range(100):
            fut = await js.publish_async(subject, body)
            fut.add_done_callback(done)
        sent += 100
    await asyncio.wait_for(js.publish_async_completed(), 30)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - c0
    await nc.close()
    return {"msgs": acked, "failed": failed, "sent": sent, "elapsed_s": elapsed, "cpu_s": cpu,
            "rate": acked / elapsed, "window": window}


# -- D: raw pull fetch + ack ------------------------------------------------------------


async def fetch(url: str, stream: str, durable: str, duration: float, batch: int, conns: int,
                expect: int) -> dict[str, Any]:
    """Drain ``stream`` through one durable with ``conns`` concurrent fetch(batch) + ack loops.

    Stops when ``expect`` messages were consumed (drained) or after ``duration``; the rate is
    messages over the time until the last message was acknowledged."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await connect(url, pending_size=8 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                  deliver_policy=DeliverPolicy.ALL, max_ack_pending=-1))
    subs = [await js.pull_subscribe_bind(durable=durable, stream=stream) for _ in range(conns)]
    count = 0
    last = 0.0
    c0, t0 = time.process_time(), time.monotonic()
    end = t0 + duration

    async def loop(sub: Any) -> None:
        nonlocal count, last
        while time.monotonic() < end and count < expect:
            try:
                msgs = await sub.fetch(batch, timeout=min(1.0, max(0.05, end - time.monotonic())))
            except Exception:  # nats TimeoutError: nothing left
                continue
            for m in msgs:
                await m.ack()
            count += len(msgs)
            last = time.monotonic()

    await asyncio.gather(*(loop(s) for s in subs))
    await nc.flush()
    elapsed = (last or time.monotonic()) - t0
    cpu = time.process_time() - c0
    await nc.close()
    return {"msgs": count, "elapsed_s": elapsed, "cpu_s": cpu, "rate": count / elapsed if elapsed > 0 else 0.0,
            "drained": count >= expect, "conns": conns}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("rest", "grpc"):
        s = sub.add_parser(name)
        s.add_argument("--url", required=True)
        s.add_argument("--port", type=int, default=0)
        s.add_argument("--subject", default=f"{RAW_STREAM}.{name}")
    s = sub.add_parser("publish")
    s.add_argument("--url", required=True)
    s.add_argument("--subject", default=f"{RAW_STREAM}.a")
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--window", type=int, default=1000)
    s.add_argument("--size", type=int, default=256)
    s = sub.add_parser("fetch")
    s.add_argument("--url", required=True)
    s.add_argument("--stream", default=DRAIN_STREAM)
    s.add_argument("--durable", required=True)
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--batch", type=int, default=100)
    s.add_argument("--conns", type=int, default=1)
    s.add_argument("--expect", type=int, required=True)
    a = p.parse_args(argv)
    if a.cmd == "rest":
        _run(serve_rest(a.url, a.port, a.subject))
    elif a.cmd == "grpc":
        _run(serve_grpc(a.url, a.port, a.subject))
    else:
        result: dict[str, Any] = {}

        async def go() -> None:
            if a.cmd == "publish":
                result.update(await publish(a.url, a.subject, a.duration, a.window, a.size))
            else:
                result.update(await fetch(a.url, a.stream, a.durable, a.duration, a.batch, a.conns, a.expect))

        _run(go())
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
