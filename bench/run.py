"""Benchmark the gateway against the limits of the same broker, in the same run.

    python bench/run.py [--duration S] [--quick] [--runs N] [--only KEYS] [--loadgen auto|native|python] [--pinned]

Starts its own nats-server (loopback, temporary directory), the gateway, and two minimal
baseline servers, then measures with 256-byte messages:

  A  raw nats-py JetStream publish_async, a window of messages in flight       (msg/s)
  B  a minimal aiohttp handler: publish the body, await the ack, 50 conns      (req/s, p50, p99)
  C  a minimal grpc.aio unary handler doing the same                           (RPC/s)
  D  raw nats-py pull fetch(100) + ack, draining a pre-filled stream           (msg/s)
  the gateway: REST produce/single (JWT, headers mapped) vs B, REST produce/batch(100)
  vs A, gRPC unary produce vs C, gRPC streaming produce vs A, REST consume/batch(100)
  with auto-ack vs D, and its peak RSS,

and prints one table with each figure, its ratio to the matching baseline, the target, and the
CPU each side used (which side was the bottleneck). ``--runs N`` prints medians of N runs.

The headline table is measured as deployed: no process pinned to a CPU (the scheduler places
the gateway, nats-server and the load generator), and the gateway with the settings users get
(log level INFO: one access line per call). ``--pinned`` adds a second view, measured after the
first in the same run: the servers under test (gateway, B, C and the Python clients A and D)
pinned to one CPU, nats-server and the load generator to another. Every produced figure is
checked against the broker: messages the broker did not store are not counted as sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(_root), str(_root / "generated")]

from bench.common import (
    DRAIN_STREAM,
    HOST,
    MEMPHIS_HEADERS,
    MSG_SIZE,
    RAW_STREAM,
    Child,
    CpuMeter,
    Pinning,
    RssSampler,
    all_cpus,
    connect,
    cpus_busy_s,
    ensure_stream,
    free_port,
    median,
    payload,
    pin_self,
    prefill,
    python,
    run_measured,
    set_affinity,
    spawn,
    stream_msgs,
)
from bench.loadgen import LoadResult, Tools, grpc_call, grpc_frames, http_post

PRODUCE_STATION = "bench_produce"
CONSUME_STATION = "bench_consume"
JWT_SECRET = "bench-" + secrets.token_hex(24)
BASELINES = str(Path(__file__).resolve().parent / "baselines.py")
REST_HEADERS = {"Content-Type": "application/json", "X-Bench-Trace": "4bf92f3577b34da6", "X-Bench-Source": "bench"}


BASELINE_OF = {"single": "B", "unary": "C", "batch": "A", "stream": "A", "consume": "D"}
SCHED_KEYS = ("B", "single", "C", "unary", "batch", "stream")  # --sched records these (the produce figures)


@dataclass(frozen=True, slots=True)
class Config:
    duration: float
    warmup: float
    runs: int
    quick: bool
    single_conns: int = 50
    batch_size: int = 100
    batch_conns: int = 10  # 1000 messages in flight; more only adds latency (the gateway is CPU-bound)
    window: int = 4000  # A: publish_async messages in flight (nats-py's default cap; 1000 leaves it latency-bound)
    grpc_conns: int = 4
    grpc_streams: int = 16  # per connection: 64 unary calls in flight
    stream_conns: int = 2
    stream_frame: int = 250  # messages per ProduceStream frame
    stream_frames: int = 8  # frames per call: 2000 messages (a finer count than 1 call = 5000)
    consume_conns: int = 4
    consume_batch: int = 100
    drain_msgs: int = 160_000
    only: frozenset[str] = frozenset()  # figure keys to measure (with their baselines); empty = all

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Config:
        cfg = cls._sized(a)
        wanted = {k.strip() for k in (getattr(a, "only", "") or "").split(",") if k.strip()}
        if not wanted:
            return cfg
        unknown = wanted - set(BASELINE_OF) - set(BASELINE_OF.values())
        if unknown:
            raise SystemExit(f"--only: unknown figure(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted({*BASELINE_OF, *BASELINE_OF.values()}))}")
        wanted |= {BASELINE_OF[k] for k in wanted if k in BASELINE_OF}
        return dataclasses.replace(cfg, only=frozenset(wanted))

    @classmethod
    def _sized(cls, a: argparse.Namespace) -> Config:
        if a.quick:
            return cls(duration=1.0, warmup=0.0, runs=a.runs or 1, quick=True, single_conns=8, batch_conns=4,
                       grpc_conns=2, grpc_streams=4, stream_conns=1, stream_frame=100, stream_frames=5,
                       consume_conns=2, drain_msgs=3000)
        duration = a.duration or 8.0
        return cls(duration=duration, warmup=min(2.0, max(1.0, duration / 4)), runs=a.runs or 1, quick=False,
                   drain_msgs=max(20_000, int(20_000 * duration)))


@dataclass(slots=True)
class Measure:
    value: float
    unit: str
    srv_cpu: float | None = None  # fraction of one core used by the server under test
    nats_cpu: float | None = None
    client_cpu: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""
    others_cpu: float | None = None  # CPU (in cores) other processes on the machine used meanwhile (noise)
    sched: str = ""  # --sched: who ran where during the measurement


@dataclass(slots=True)
class Env:
    cfg: Config
    pinning: Pinning
    tools: Tools
    work: Path
    broker: Any
    nc: Any
    js: Any
    rest_b: str = ""
    grpc_c: str = ""
    b: Child | None = None
    c: Child | None = None
    gw: Child | None = None
    gw_http: str = ""
    gw_grpc: str = ""
    jwt: str = ""
    gw_error: str = ""
    log: Callable[[str], None] = print
    gateway_cmd: tuple[str, ...] = (sys.executable, "-m", "gateway", "serve")
    gateway_log_level: str | None = None  # None: the gateway's default (INFO), like users get
    sched: bool = False  # --sched: record the scheduler during the produce figures
    sched_name: str = ""  # the figure being measured, when it is recorded
    bodies: dict[str, Path] = field(default_factory=dict)

    def servers(self) -> list[int]:
        """PIDs of the long-lived servers under test (gateway, B, C)."""
        return [c.pid for c in (self.gw, self.b, self.c) if c is not None and c.alive()]

    def pin(self, pinning: Pinning) -> None:
        """Apply ``pinning`` to the running servers and nats-server (every thread), and use it for
        the load generators and Python clients started from now on."""
        self.pinning = pinning
        every = tuple(sorted(os.sched_getaffinity(0) | set(pinning.server or ()) | set(pinning.client or ())))
        for pid in self.servers():
            set_affinity(pid, pinning.server or every)
        if self.broker.pid:
            set_affinity(self.broker.pid, pinning.client or every)
        pin_self(pinning.client or every)


# -- set-up ------------------------------------------------------------------------


async def start_server(env: Env, name: str, argv: list[str], ready: Callable[[], Any], wait_s: float = 40.0) -> Child:
    child = spawn(name, argv, env.work, cpus=env.pinning.server, pinning=env.pinning)
    deadline = time.monotonic() + wait_s
    while True:
        if not child.alive():
            raise RuntimeError(f"{name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(Exception):
            if await ready():
                return child
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"{name} not ready after {wait_s:.0f} s:\n{child.log_tail()}")
        await asyncio.sleep(0.1)


async def start_baselines(env: Env) -> None:
    base = [python(), BASELINES]
    for kind in ("rest", "grpc"):
        port = free_port()
        path = env.work / f"baseline-{kind}.log"

        async def ready(path: Path = path) -> bool:
            return _logged_ready(path)

        child = await start_server(env, f"baseline-{kind}", [*base, kind, "--url", env.broker.url, "--port",
                                                                str(port)], ready)
        if kind == "rest":
            env.b, env.rest_b = child, f"http://{HOST}:{port}"
        else:
            env.c, env.grpc_c = child, f"{HOST}:{port}"


def _logged_ready(path: Path) -> bool:
    return path.exists() and "READY" in path.read_text(errors="replace")


async def start_gateway(env: Env) -> None:
    import aiohttp

    http_port, grpc_port = free_port(), free_port()
    argv = [*env.gateway_cmd, "--broker", env.broker.url, "--control-plane",
            "--host", HOST, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--root-user", "root", "--root-password", "memphis", "--jwt-secret", JWT_SECRET]
    if env.gateway_log_level:
        argv += ["--log-level", env.gateway_log_level]
    env.gw_http, env.gw_grpc = f"http://{HOST}:{http_port}", f"{HOST}:{grpc_port}"
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            async with http.post(f"{env.gw_http}/auth/authenticate",
                                 json={"username": "root", "password": "memphis", "token_expiry_in_minutes": 600},
                                 timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    return False
                env.jwt = (await resp.json())["jwt"]
                return True

        env.gw = await start_server(env, "gateway", argv, ready)
        # Create the stations through the gateway (its control plane), one message each.
        for station in (PRODUCE_STATION, CONSUME_STATION):
            async with http.post(f"{env.gw_http}/stations/{station}/produce/single", data=payload(),
                                 headers={**REST_HEADERS, "Authorization": f"Bearer {env.jwt}"}) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"gateway produce into {station}: HTTP {resp.status} {text[:300]}")


def write_bodies(env: Env) -> None:
    from google.api import httpbody_pb2
    from memgw.v1 import produce_pb2

    cfg, body = env.cfg, payload()
    files = {
        "single": body,
        "batch": b"[" + b",".join([body] * cfg.batch_size) + b"]",
        "consume": json.dumps({"consumer_name": "c1", "batch_size": cfg.consume_batch,
                               "batch_max_wait_time_ms": 1000}).encode(),
        "unary": grpc_frames([produce_pb2.ProduceSingleRequest(
            station=PRODUCE_STATION, body=httpbody_pb2.HttpBody(content_type="application/json", data=body),
            headers={"x-bench-trace": "4bf92f3577b34da6"}).SerializeToString()]),
        "stream": grpc_frames([produce_pb2.ProduceStreamRequest(
            station=PRODUCE_STATION, messages=[produce_pb2.ProducedMessage(data=body)] * cfg.stream_frame
        ).SerializeToString()] * cfg.stream_frames),
    }
    for name, data in files.items():
        path = env.work / f"body-{name}.bin"
        path.write_bytes(data)
        env.bodies[name] = path


# -- one measurement ----------------------------------------------------------------


def nats_meter(env: Env) -> CpuMeter:
    return CpuMeter(env.broker.pid)


async def settle(env: Env, log: Callable[[str], None], limit_s: float = 10.0) -> None:
    """Wait until the servers and nats-server are idle: a server still busy with the previous
    load (calls abandoned by the load generator at its deadline) would steal the next one's CPU."""
    meters = [CpuMeter(c.pid) for c in (env.gw, env.b, env.c) if c is not None and c.alive()]
    meters.append(nats_meter(env))
    t0 = time.monotonic()
    deadline = t0 + limit_s
    while True:
        for m in meters:
            m.start()
        await asyncio.sleep(0.25)
        busy = sum(m.stop().cpu_s for m in meters) / 0.25
        if busy < 0.08:
            if time.monotonic() - t0 > 1.0:
                log(f"  (waited {time.monotonic() - t0:.1f} s for the servers to go idle)")
            return
        if time.monotonic() > deadline:
            log(f"  servers still busy ({busy * 100:.0f}% of a core) after {limit_s:g} s; measuring anyway")
            return


async def produce_phase(env: Env, stream: str, server_pid: int, per_request: int,
                        load: Callable[[float], Any]) -> Measure:
    """Warm up, then measure one load; the figure is checked against what the broker stored."""
    with contextlib.suppress(Exception):
        await env.js.purge_stream(stream)
    if env.cfg.warmup > 0:
        await load(env.cfg.warmup)
        await settle(env, env.log)  # calls the warm-up abandoned at its deadline must not count
    before = await stream_msgs(env.js, stream)
    srv, nats = CpuMeter(server_pid).start(), nats_meter(env).start()
    noise = Noise(env).start()
    rec = None
    if env.sched_name:
        from bench.sched import Recording

        rec = Recording(max(1.0, env.cfg.duration - 1.0)).start()
    r: LoadResult = await load(env.cfg.duration)
    srv.stop()
    nats.stop()
    others = noise.others(srv.cpu_s, nats.cpu_s, r.client_cpu_s)
    sched = ""
    if rec is not None:
        from bench.sched import threads_of

        sched = await asyncio.to_thread(rec.report, server_pid, {"nats-server": threads_of(env.broker.pid or 0)},
                                        env.sched_name)
    stored = await stream_msgs(env.js, stream) - before
    claimed = r.requests * per_request
    note = ""
    if stored < claimed * 0.99:
        note = f"broker stored only {stored} of {claimed} messages"
    if r.errors:
        note = (note + "; " if note else "") + f"{r.errors} failed requests"
    if per_request == 1:  # requests/s, each confirmed by a stored message
        value = min(claimed, stored) / r.elapsed_s if r.elapsed_s > 0 else 0.0
    else:  # messages/s as stored by the broker (batches and streams still in flight at the deadline count)
        value = stored / r.elapsed_s if r.elapsed_s > 0 else 0.0
    # CPU shares over the measured interval (the servers idle while the load generator starts).
    span = r.elapsed_s if r.elapsed_s > 0 else srv.wall_s
    return Measure(value, "", srv.cpu_s / span, nats.cpu_s / span, r.client_cpu, r.p50_ms, r.p99_ms, note, others,
                   sched)


@dataclass(slots=True)
class Noise:
    """CPU (in cores) that processes other than the benchmark's used during a measurement: other
    jobs on the machine. Pinned: on the server CPU, less the process under test. Unpinned: on
    every CPU, less all the benchmark runs (server, nats-server, load generator, this process)."""

    env: Env
    t0: float = 0.0
    busy0: float = 0.0
    self0: float = 0.0

    def cpus(self) -> tuple[int, ...]:
        return self.env.pinning.server if self.env.pinning.server is not None else all_cpus()

    def start(self) -> Noise:
        self.t0, self.busy0, self.self0 = time.monotonic(), cpus_busy_s(self.cpus()), time.process_time()
        return self

    def others(self, server_cpu_s: float, nats_cpu_s: float, client_cpu_s: float) -> float | None:
        """Call at the end of the measurement, with the CPU seconds each side used meanwhile."""
        wall = time.monotonic() - self.t0
        busy = cpus_busy_s(self.cpus()) - self.busy0
        if wall <= 0 or busy <= 0:
            return None
        ours = server_cpu_s
        if not self.env.pinning.active:
            ours += nats_cpu_s + client_cpu_s + (time.process_time() - self.self0)
        return max(0.0, (busy - ours) / wall)


async def python_client(env: Env, argv: list[str]) -> tuple[dict[str, Any], float, float | None]:
    """Run baseline A or D (a Python process pinned like the gateway): its JSON, nats-server's CPU share,
    and the share of the server CPU that other processes used meanwhile."""
    nats = nats_meter(env).start()
    noise = Noise(env).start()
    fin = await asyncio.to_thread(run_measured, [python(), BASELINES, *argv], timeout=env.cfg.duration + 60,
                                  cpus=env.pinning.server, pinning=env.pinning)
    nats.stop()
    others = noise.others(fin.cpu_s, nats.cpu_s, 0.0)
    for line in fin.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), nats.cpu_s / nats.wall_s, others
    raise RuntimeError(f"baseline {argv[0]} failed ({fin.returncode}):\n{fin.stdout[-1000:]}\n{fin.stderr[-2000:]}")


async def baseline_a(env: Env) -> Measure:
    with contextlib.suppress(Exception):
        await env.js.purge_stream(RAW_STREAM)
    r, nats, others = await python_client(env, ["publish", "--url", env.broker.url, "--duration", str(env.cfg.duration),
                                        "--window", str(env.cfg.window), "--size", str(MSG_SIZE)])
    note = f"{r['failed']} publishes failed" if r["failed"] else ""
    return Measure(r["rate"], "msg/s", r["cpu_s"] / r["elapsed_s"], nats, None, note=note, others_cpu=others)


async def baseline_d(env: Env, run: int) -> Measure:
    r, nats, others = await python_client(env, ["fetch", "--url", env.broker.url, "--stream", DRAIN_STREAM,
                                        "--durable", f"bench_d{run}", "--duration", str(env.cfg.duration),
                                        "--batch", str(env.cfg.consume_batch), "--conns", str(env.cfg.consume_conns),
                                        "--expect", str(env.cfg.drain_msgs)])
    note = "" if r["drained"] else "stream not drained: capped by --duration"
    return Measure(r["rate"], "msg/s", r["cpu_s"] / max(r["elapsed_s"], 1e-9), nats, None, note=note,
                   others_cpu=others)


def rest_produce(env: Env, url: str, body: str, conns: int, auth: bool) -> Callable[[float], Any]:
    headers = dict(REST_HEADERS)
    if auth:
        headers["Authorization"] = f"Bearer {env.jwt}"

    async def load(duration: float) -> LoadResult:
        return await http_post(url, env.bodies[body], headers, conns=conns, duration=duration, tool=env.tools.http,
                               pinning=env.pinning, work_dir=env.work)

    return load


def grpc_load(env: Env, target: str, method: str, body: str, kind: str, conns: int, streams: int,
              auth: bool) -> Callable[[float], Any]:
    metadata = {"authorization": f"Bearer {env.jwt}"} if auth else {}

    async def load(duration: float) -> LoadResult:
        return await grpc_call(target, method, env.bodies[body], metadata, kind=kind, conns=conns, streams=streams,
                               duration=duration, tool=env.tools.grpc, pinning=env.pinning)

    return load


async def consumer_acked(env: Env, stream: str, group_hint: str) -> tuple[int, int]:
    """(acknowledged, pending) of the consumer group on ``stream`` whose durable mentions ``group_hint``."""
    for info in await env.js.consumers_info(stream):
        name = info.name or info.config.durable_name or ""
        if group_hint in name.lower():
            return int(info.ack_floor.consumer_seq), int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    raise RuntimeError(f"no consumer for group {group_hint!r} on {stream}: the gateway did not create it")


async def gateway_consume(env: Env, run: int) -> Measure:
    """REST consume/batch(100) with auto-ack draining the pre-filled station, measured at the broker."""
    import aiohttp

    assert env.gw is not None
    group = f"bench_g{run}"
    body = json.loads(env.bodies["consume"].read_bytes())
    body["consumer_group"] = group
    path = env.work / f"body-consume-{run}.json"
    path.write_bytes(json.dumps(body).encode())
    env.bodies[f"consume-{run}"] = path
    url = f"{env.gw_http}/stations/{CONSUME_STATION}/consume/batch"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {env.jwt}"}
    async with aiohttp.ClientSession() as http:  # creates the group's durable (one message)
        async with http.post(url, json={**body, "batch_size": 1}, headers=headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"consume/batch: HTTP {resp.status} {text[:300]}")
    stream = f"{CONSUME_STATION}$1"
    acked0, _ = await consumer_acked(env, stream, group)
    gw_cpu, nats_cpu, noise = CpuMeter(env.gw.pid), nats_meter(env), Noise(env)
    stop = threading.Event()
    task = asyncio.create_task(http_post(url, path, headers, conns=env.cfg.consume_conns, duration=env.cfg.duration,
                                         tool=env.tools.http, pinning=env.pinning, work_dir=env.work, stop=stop))
    # The rate is the slope between the first and the last poll that saw progress, so the load
    # generator's start-up and the tail after the station ran dry are not counted.
    first: tuple[float, int, float, float, float, float] | None = None
    last: tuple[float, int, float, float, float, float] | None = None
    acked, drained = acked0, False
    try:
        while not task.done():
            await asyncio.sleep(0.05)
            now_acked, pending = await consumer_acked(env, stream, group)
            if now_acked > acked:
                acked = now_acked
                point = (time.monotonic(), now_acked, gw_cpu.cpu(), nats_cpu.cpu(), cpus_busy_s(noise.cpus()),
                         time.process_time())
                if first is None:
                    first = point
                last = point
            if pending == 0 and acked > acked0:
                drained = True
                break
    finally:
        stop.set()  # the load generator stops (SIGINT) and reports
        r = await task
    note = "" if drained else "station not drained: capped by --duration"
    if r.errors:
        note = (note + "; " if note else "") + f"{r.errors} failed requests"
    if first is None or last is None or last[0] <= first[0]:
        return Measure(math.nan, "msg/s", note=(note + "; " if note else "") + "too few messages to time")
    span = last[0] - first[0]
    gw_s, nats_s, busy_s = last[2] - first[2], last[3] - first[3], last[4] - first[4]
    ours = gw_s if env.pinning.active else gw_s + nats_s + r.client_cpu * span + last[5] - first[5]
    return Measure((last[1] - first[1]) / span, "msg/s", gw_s / span, nats_s / span, r.client_cpu, note=note,
                   others_cpu=max(0.0, (busy_s - ours) / span))


async def one_run(env: Env, run: int, log: Callable[[str], None]) -> dict[str, Measure]:
    cfg = env.cfg
    out: dict[str, Measure] = {}
    assert env.b is not None and env.c is not None
    b_pid, c_pid = env.b.pid, env.c.pid
    gw_ok = env.gw is not None and env.gw.alive()
    gw_pid = env.gw.pid if env.gw is not None else 0
    produce_stream = f"{PRODUCE_STATION}$1"
    grpc_unary = "/memgw.v1.ProduceService/ProduceSingle"
    grpc_stream = "/memgw.v1.ProduceService/ProduceStream"
    single_path = f"/stations/{PRODUCE_STATION}/produce/single"

    async def step(key: str, what: Callable[[], Any]) -> None:
        if cfg.only and key not in cfg.only:
            return
        log(f"run {run + 1}/{cfg.runs}: {key} ...")
        await settle(env, log)
        env.sched_name = key if env.sched and key in SCHED_KEYS else ""
        try:
            out[key] = await what()
        except Exception as exc:  # one failed figure must not lose the table
            out[key] = Measure(math.nan, "", note=f"error: {str(exc).strip().splitlines()[0][:150]}")
            log(f"  {key} failed: {exc}")
        finally:
            env.sched_name = ""

    await step("B", lambda: produce_phase(env, RAW_STREAM, b_pid, 1,
                                          rest_produce(env, env.rest_b + single_path, "single", cfg.single_conns,
                                                       auth=False)))
    if gw_ok:
        await step("single", lambda: produce_phase(env, produce_stream, gw_pid, 1,
                                                   rest_produce(env, env.gw_http + single_path, "single",
                                                                cfg.single_conns, auth=True)))
    await step("C", lambda: produce_phase(env, RAW_STREAM, c_pid, 1,
                                          grpc_load(env, env.grpc_c, grpc_unary, "unary", "unary", cfg.grpc_conns,
                                                    cfg.grpc_streams, auth=False)))
    if gw_ok:
        await step("unary", lambda: produce_phase(env, produce_stream, gw_pid, 1,
                                                  grpc_load(env, env.gw_grpc, grpc_unary, "unary", "unary",
                                                            cfg.grpc_conns, cfg.grpc_streams, auth=True)))
    await step("A", lambda: baseline_a(env))
    if gw_ok:
        batch_path = f"/stations/{PRODUCE_STATION}/produce/batch"
        await step("batch", lambda: produce_phase(env, produce_stream, gw_pid, cfg.batch_size,
                                                  rest_produce(env, env.gw_http + batch_path, "batch",
                                                               cfg.batch_conns, auth=True)))
        await step("stream", lambda: produce_phase(env, produce_stream, gw_pid,
                                                   cfg.stream_frame * cfg.stream_frames,
                                                   grpc_load(env, env.gw_grpc, grpc_stream, "stream", "stream",
                                                             cfg.stream_conns, 1, auth=True)))
    await step("D", lambda: baseline_d(env, run))
    if gw_ok:
        await step("consume", lambda: gateway_consume(env, run))
    return out


# -- the table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    unit: str
    baseline: str | None = None  # key of the baseline figure
    target: str = ""  # e.g. ">= 0.85x", "<= 1.5x", "<= 200"
    field: str = "value"  # value, p50_ms, p99_ms


def rows(cfg: Config) -> list[Row]:
    sc, bs = cfg.single_conns, cfg.batch_size
    return [
        Row("A", f"A  raw JetStream publish_async (window {cfg.window})", "msg/s"),
        Row("B", f"B  minimal aiohttp produce ({sc} conns)", "req/s"),
        Row("B", "B  minimal aiohttp produce p50", "ms", field="p50_ms"),
        Row("B", "B  minimal aiohttp produce p99", "ms", field="p99_ms"),
        Row("C", f"C  minimal grpc.aio unary produce ({cfg.grpc_conns}x{cfg.grpc_streams} streams)", "RPC/s"),
        Row("D", f"D  raw pull fetch({cfg.consume_batch})+ack ({cfg.consume_conns} loops)", "msg/s"),
        Row("single", f"GW REST produce/single, JWT+headers ({sc} conns)", "req/s", "B", ">= 0.9x"),
        Row("single", "GW REST produce/single p50", "ms", "B", "", "p50_ms"),
        Row("single", "GW REST produce/single p99", "ms", "B", "<= 1.3x", "p99_ms"),
        Row("batch", f"GW REST produce/batch({bs}) ({cfg.batch_conns} conns)", "msg/s", "A", ">= 1.5x"),
        Row("unary", f"GW gRPC unary produce ({cfg.grpc_conns}x{cfg.grpc_streams} streams)", "RPC/s", "C",
            ">= 0.9x"),
        Row("stream", f"GW gRPC stream produce ({cfg.stream_conns} calls, frames of {cfg.stream_frame})", "msg/s",
            "A", ">= 1.5x"),
        Row("consume", f"GW REST consume/batch({cfg.consume_batch}) auto-ack ({cfg.consume_conns} conns)", "msg/s",
            "D", ">= 0.8x"),
        Row("rss", "GW peak RSS", "MB", None, "<= 200"),
    ]


def combine(runs: list[dict[str, Measure]]) -> dict[str, Measure]:
    """Per figure, the median of the runs (each field on its own)."""
    out: dict[str, Measure] = {}
    for key in {k for r in runs for k in r}:
        ms = [r[key] for r in runs if key in r]

        def med(attr: str, ms: list[Measure] = ms) -> float | None:
            vals = [getattr(m, attr) for m in ms if getattr(m, attr) is not None and not math.isnan(getattr(m, attr))]
            return median(vals) if vals else None

        value = med("value")
        out[key] = Measure(math.nan if value is None else value, ms[0].unit, med("srv_cpu"), med("nats_cpu"),
                           med("client_cpu"), med("p50_ms"), med("p99_ms"),
                           "; ".join(sorted({m.note for m in ms if m.note})), med("others_cpu"),
                           next((m.sched for m in ms if m.sched), ""))
    return out


def _num(v: float | None, unit: str = "") -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if unit == "ms" or abs(v) < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 100:.0f}%"


NOISY = 0.15  # other processes used this much CPU (in cores) meanwhile: the figure is disturbed


def _noisy(m: Measure | None) -> bool:
    return m is not None and m.others_cpu is not None and m.others_cpu >= NOISY


def verdict(m: Measure, pinned: bool = False) -> str:
    """Which side limited the figure, from the CPU each used."""
    if m.srv_cpu is None:
        return "-"
    if m.others_cpu is not None and m.others_cpu >= NOISY:
        return "NOISE: CPU shared"
    if m.srv_cpu >= 0.85:
        return "server CPU"
    if pinned and (m.nats_cpu or 0) + (m.client_cpu or 0) >= 0.85:
        return "nats+client CPU"
    if not pinned and m.srv_cpu + (m.nats_cpu or 0) + (m.client_cpu or 0) >= 0.85 * len(all_cpus()):
        return "all CPUs busy"
    return "latency/concurrency"


def table(cfg: Config, res: dict[str, Measure], pinned: bool = False) -> tuple[str, bool]:
    head = ["figure", "value", "unit", "baseline", "ratio", "target", "ok?", "srv CPU", "per srv core",
            "nats CPU", "client CPU", "others", "limited by"]
    lines: list[list[str]] = []
    all_ok = True
    noisy_rows = 0
    for row in rows(cfg):
        if cfg.only and row.key not in cfg.only and row.key != "rss":
            continue
        m = res.get(row.key)
        if m is None:
            lines.append([row.label, "n/a", row.unit, "", "", row.target, "FAIL" if row.target else "", "", "", "",
                          "", "", "not measured"])
            all_ok = all_ok and not row.target
            continue
        value = getattr(m, row.field) if row.field != "value" else m.value
        base_txt = ratio_txt = ok = ""
        if row.baseline is not None:
            b = res.get(row.baseline)
            bval = None if b is None else (getattr(b, row.field) if row.field != "value" else b.value)
            base_txt = f"{row.baseline} {_num(bval, row.unit)}"
            if bval and value is not None and not math.isnan(value) and not math.isnan(bval):
                ratio = value / bval
                ratio_txt = f"{ratio:.2f}x"
                if row.target:
                    limit = float(row.target.split()[1].rstrip("x"))
                    good = ratio >= limit if row.target.startswith(">=") else ratio <= limit
                    ok = "ok" if good else "FAIL"
            elif row.target:
                ok = "FAIL"
        elif row.target:  # absolute target (RSS)
            limit = float(row.target.split()[1])
            good = value is not None and not math.isnan(value) and value <= limit
            ok = "ok" if good else "FAIL"
        all_ok = all_ok and ok != "FAIL"
        if ok and (_noisy(m) or (row.baseline is not None and _noisy(res.get(row.baseline)))):
            ok += "?"  # this figure or its baseline was disturbed by other processes
            noisy_rows += 1
        cpu_cols = ["", "", "", "", "", ""]
        if row.field == "value" and row.key != "rss":
            per_core = value / m.srv_cpu if m.srv_cpu and value is not None and not math.isnan(value) else None
            cpu_cols = [_pct(m.srv_cpu), _num(per_core), _pct(m.nats_cpu), _pct(m.client_cpu), _pct(m.others_cpu),
                        verdict(m, pinned)]
        lines.append([row.label, _num(value, row.unit), row.unit, base_txt, ratio_txt, row.target, ok, *cpu_cols])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    right = {1, 4, 7, 8, 9, 10, 11}

    def fmt(cells: list[str]) -> str:
        return " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                  strict=True)))

    out = [fmt(head).rstrip(), "-+-".join("-" * w for w in widths), *(fmt(line).rstrip() for line in lines)]
    notes = [f"  {key}: {m.note}" for key, m in sorted(res.items()) if m.note]
    if noisy_rows:
        notes.append(f"  ?: {noisy_rows} verdict(s) rest on a figure disturbed by other processes (others >= "
                     f"{NOISY:.0%}); re-run on a quiet machine or with --runs 3")
    if notes:
        out += ["notes:", *notes]
    return "\n".join(out), all_ok


# -- main -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def environment(cfg: Config, pinning: Pinning, tools: Tools, work: Path, log: Callable[[str], None],
                      gateway_cmd: tuple[str, ...] | None = None,
                      gateway_log_level: str | None = None) -> AsyncIterator[Env]:
    """nats-server, baselines B and C, the gateway (if it starts), pre-filled streams; all stopped after."""
    from gateway.embedded.server import EmbeddedBroker

    broker = EmbeddedBroker(data_dir=work / "nats", port=0, root_user="root", root_password="memphis")
    env: Env | None = None
    try:
        await broker.start()
        nc = await connect(broker.url, pending_size=16 * 1024 * 1024)
        js = nc.jetstream(timeout=10)
        env = Env(cfg, pinning, tools, work, broker, nc, js, log=log, gateway_log_level=gateway_log_level)
        if gateway_cmd:
            env.gateway_cmd = gateway_cmd
        await ensure_stream(js, RAW_STREAM)
        await ensure_stream(js, DRAIN_STREAM)
        write_bodies(env)
        log(f"nats-server pid {broker.pid} at {broker.url}; starting baselines B and C")
        await start_baselines(env)
        log("starting the gateway")
        try:
            await start_gateway(env)
        except Exception as exc:
            env.gw_error = str(exc)
            if env.gw is not None:
                env.gw.stop()
                env.gw = None
            log(f"gateway unavailable, measuring the baselines only: {exc}")
        log(f"pre-filling {cfg.drain_msgs} messages for D and for the gateway's consume")
        await prefill(nc, js, DRAIN_STREAM, f"{DRAIN_STREAM}.x", cfg.drain_msgs, MEMPHIS_HEADERS)
        if env.gw is not None:
            await prefill(nc, js, f"{CONSUME_STATION}$1", f"{CONSUME_STATION}$1.final", cfg.drain_msgs,
                          MEMPHIS_HEADERS)
        yield env
    finally:
        if env is not None:
            for child in (env.gw, env.b, env.c):
                if child is not None:
                    child.stop()
            with contextlib.suppress(Exception):
                await env.nc.close()
        await broker.stop()


async def amain(a: argparse.Namespace) -> int:
    import signal

    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)  # clean up like on Ctrl-C
    cfg = Config.from_args(a)
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    views = [("unpinned", Pinning.choose(False))]
    if a.pinned:
        pinned = Pinning.choose(True)
        if pinned.active:
            views.append(("pinned", pinned))
        else:
            log("--pinned: needs 2+ CPUs and taskset; measuring the unpinned view only")
    tools = Tools.detect(a.loadgen)
    work = Path(tempfile.mkdtemp(prefix="memgw-bench-"))
    try:
        gateway_cmd = tuple(shlex.split(a.gateway_cmd)) if a.gateway_cmd else None
        results: list[tuple[str, Pinning, dict[str, Measure]]] = []
        if a.sched:
            from bench.sched import available

            why = available()
            if why:
                raise SystemExit(f"--sched: {why}")
        async with environment(cfg, views[0][1], tools, work, log, gateway_cmd, a.log_level) as env:
            env.sched = a.sched
            for index, (view, pinning) in enumerate(views):
                env.pin(pinning)
                log(f"view {view}: {pinning.describe()}")
                rss = RssSampler(env.gw.pid).start() if env.gw is not None else None
                try:
                    runs = [await one_run(env, index * cfg.runs + i, log) for i in range(cfg.runs)]
                finally:
                    peak = rss.stop() if rss is not None else 0
                res = combine(runs)
                if env.gw is not None and peak:
                    res["rss"] = Measure(peak / 2**20, "MB")
                results.append((view, pinning, res))
            level = a.log_level.upper() if a.log_level else "INFO (its default: one access line per call)"
            gw = (f"1 process, log level {level}, REST {env.gw_http}, gRPC {env.gw_grpc}" if env.gw
                  else f"NOT RUNNING: {env.gw_error}")
        runs_txt = f"median of {cfg.runs} runs" if cfg.runs > 1 else "1 run"
        print()
        print(f"memphis-gateway benchmark: {MSG_SIZE}-byte messages, {cfg.duration:g} s per figure "
              f"(+{cfg.warmup:g} s warm-up), {runs_txt} per view"
              f"{' (--quick: a tiny load, figures not meaningful)' if cfg.quick else ''}")
        print(f"load generator: {tools.describe()}")
        print(f"gateway: {gw[:400]}")
        print("srv CPU = share of one core used by the process under test (gateway, B, C, or the Python client "
              "for A/D); per srv core = value / srv CPU; client CPU = the load generator's share of one core;")
        print(f"others = CPU (in cores) other processes on the machine used meanwhile: unpinned, on all CPUs less "
              f"everything the benchmark runs; pinned, on the server CPU less the process under test (>= {NOISY:g}: "
              "the figure is disturbed, re-run on a quiet machine or use --runs 3)")
        headline_ok = True
        for index, (view, pinning, res) in enumerate(results):
            text, ok = table(cfg, res, pinning.active)
            print()
            if index == 0:
                print(f"HEADLINE, as deployed: CPU pinning: {pinning.describe()}")
                headline_ok = ok
            else:
                print(f"second view, {view}: CPU pinning: {pinning.describe()} (targets shown for comparison; "
                      f"they apply to the headline)")
            print(text)
            scheds = [(k, m.sched) for k, m in res.items() if m.sched]
            if scheds:
                print("scheduler (--sched; first run):")
                for key, text in sorted(scheds, key=lambda kv: SCHED_KEYS.index(kv[0])):
                    print(f"  {key}: {text}")
        print()
        print(f"targets (headline table): {'all met' if headline_ok else 'NOT all met'}; "
              f"total time {time.monotonic() - t_start:.0f} s")
        return 0
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=None, help="seconds per figure (default 8)")
    p.add_argument("--quick", action="store_true", help="a tiny load for tests: a few seconds per figure set")
    p.add_argument("--runs", type=int, default=None, help="repeat all figures N times and print medians")
    p.add_argument("--loadgen", choices=("auto", "native", "python"), default="auto",
                   help="auto: wrk/h2load if installed else the asyncio client; native: require them")
    p.add_argument("--only", default="", metavar="KEYS",
                   help="measure only these figures, comma-separated (e.g. single,unary); their baselines "
                        "(B for single, C for unary, A for batch/stream, D for consume) are added")
    p.add_argument("--pinned", action="store_true",
                   help="also measure a second view with the servers under test pinned to one CPU and nats-server "
                        "plus the load generator to another (the headline is always unpinned)")
    p.add_argument("--sched", action="store_true",
                   help="record the scheduler (perf sched_switch, all CPUs) during the produce figures: who ran on "
                        "which CPU, how often the server's event loop was preempted and by whom (needs perf, root)")
    p.add_argument("--no-pin", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--log-level", default=None, metavar="LEVEL",
                   help="run the gateway with --log-level LEVEL (default: none given, i.e. the gateway's default "
                        "INFO, what users get)")
    p.add_argument("--gateway-cmd", default=None, metavar="CMD",
                   help="how to start the gateway (default: the venv's python -m gateway serve); the benchmark "
                        "appends --broker, ports and credentials")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, bodies, data)")
    a = p.parse_args(argv)
    runner: Callable[..., Any]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        sys.exit(runner(amain(a)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted: everything the benchmark started was stopped")


if __name__ == "__main__":
    main()
