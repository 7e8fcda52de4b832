"""How the gateway's throughput, p99 and memory grow with the work: the scaling curves.

    python bench/curves.py                 # the full grid (~3 min), writes bench/curves.png and bench/curves.json
    python bench/curves.py --reduced       # a few points per curve (~1.5 min): checks that everything runs
    python bench/curves.py --only size,conns --out /tmp/c   # some curves, elsewhere

Starts its own nats-server and gateway (loopback, temporary directory, the gateway's default
settings: unpinned, log level INFO) and measures, each point for a few seconds with wrk against
REST ``produce/single`` (50 connections, 256-byte messages, unless the curve varies that):

  size      message size, 64 B .. 1 MB                             req/s, MB/s, p99, gateway RSS
  conns     concurrent connections, 1 .. 2,000                       req/s, p99, RSS
  stations  stations the requests are spread over, 1 .. 1,000       req/s, p99, RSS
  groups    consumer groups that 10 connections of REST consume/batch(100) are spread over:
            messages/s delivered (counted at the broker), p99, RSS
  workers   --workers 1 and 2 (RSS: all worker processes)
  idle      gateway RSS and CPU with N idle keep-alive connections (each served one request) and
            with N idle long polls (consume/batch waiting on an empty station), each on a fresh
            gateway: the slope is the memory per idle connection / long poll

and draws them (matplotlib) into one PNG, the numbers into JSON. Each point's ``others`` is the
CPU (in cores) that processes outside the benchmark used meanwhile: on a shared machine the
curves are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(_root), str(_root / "generated")]

from bench.common import (
    HOST,
    MEMPHIS_HEADERS,
    Child,
    Pinning,
    all_cpus,
    connect,
    cpus_busy_s,
    free_port,
    payload,
    prefill,
    python,
    run_measured,
    spawn,
)
from bench.loadgen import _lua_str, _result_json, wrk_script

HERE = Path(__file__).resolve().parent
JWT_SECRET = "curves-" + secrets.token_hex(24)
NO_PIN = Pinning(None, None)
CURVES = ("size", "conns", "stations", "groups", "workers", "idle")


@dataclass(frozen=True, slots=True)
class Grid:
    seconds: int  # measured seconds per point (wrk counts whole seconds)
    warmup: int
    sizes: tuple[int, ...]
    conns: tuple[int, ...]
    stations: tuple[int, ...]
    groups: tuple[int, ...]
    workers: tuple[int, ...]
    idle: tuple[int, ...]  # idle connections / long polls, cumulative steps
    consume_prefill: int
    reduced: bool

    @classmethod
    def full(cls) -> Grid:
        return cls(seconds=2, warmup=1, sizes=(64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
                   conns=(1, 10, 50, 200, 500, 1000, 2000), stations=(1, 10, 100, 1000), groups=(1, 10, 100),
                   workers=(1, 2), idle=(0, 500, 1000, 2000, 4000), consume_prefill=150_000, reduced=False)

    @classmethod
    def small(cls) -> Grid:
        return cls(seconds=1, warmup=1, sizes=(64, 4096, 65536, 1048576), conns=(1, 50, 500, 2000),
                   stations=(1, 100), groups=(1, 10), workers=(1, 2), idle=(0, 500, 1000), consume_prefill=30_000,
                   reduced=True)


@dataclass(slots=True)
class Point:
    x: float
    rate: float  # req/s (messages/s for groups)
    p99_ms: float | None
    rss_mb: float  # peak RSS of the gateway (all its worker processes) during the point
    gw_cpu: float  # cores the gateway used
    others: float | None  # cores other processes on the machine used meanwhile
    errors: int = 0
    mb_s: float | None = None
    note: str = ""


@dataclass(slots=True)
class Idle:
    n: int
    rss_mb: float
    gw_cpu: float  # cores the gateway used while they idled


@dataclass(slots=True)
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[Point]] = field(default_factory=dict)
    idle: dict[str, list[Idle]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"meta": self.meta, "curves": {}, "idle": {}}
        for k, pts in self.curves.items():
            out["curves"][k] = [asdict(p) for p in pts]
        for k, ids in self.idle.items():
            out["idle"][k] = {"points": [asdict(i) for i in ids], "kb_per_item": slope_kb(ids)}
        return out


def slope_kb(points: Sequence[Idle]) -> float | None:
    """Least-squares slope of RSS against N, in KiB per item."""
    if len(points) < 2:
        return None
    xs, ys = [p.n for p in points], [p.rss_mb for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 1024


# -- processes -------------------------------------------------------------------------


def process_tree_rss(pid: int) -> int:
    """RSS of a process and its descendants (a --workers supervisor and its workers)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class TreeCpu:
    """CPU seconds of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


class PeakRss:
    """Samples the RSS of a process tree in the background; ``stop()`` returns the peak in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, await asyncio.to_thread(process_tree_rss, self.pid))
            await asyncio.sleep(self.interval_s)

    def start(self) -> PeakRss:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return max(self.peak, process_tree_rss(self.pid))


@dataclass(slots=True)
class Gateway:
    child: Child
    http: str
    jwt: str = ""

    @property
    def pid(self) -> int:
        return self.child.pid


@contextlib.asynccontextmanager
async def gateway(broker_url: str, work: Path, name: str, *extra: str) -> AsyncIterator[Gateway]:
    """A gateway on ``broker_url`` with its default settings (plus ``extra`` flags), stopped after."""
    import aiohttp

    http_port, grpc_port = free_port(), free_port()
    argv = [python(), "-m", "gateway", "serve", "--broker", broker_url, "--control-plane", "--host", HOST,
            "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--root-user", "root",
            "--root-password", "memphis", "--jwt-secret", JWT_SECRET,
            "--max-stations-per-user", "0",  # the stations curve makes 1,000 of them (default quota: 1,000 per user)
            *extra]
    child = spawn(name, argv, work, cpus=None, pinning=NO_PIN)
    gw = Gateway(child, f"http://{HOST}:{http_port}")
    try:
        deadline = time.monotonic() + 40
        async with aiohttp.ClientSession() as http:
            while True:
                if not child.alive():
                    raise RuntimeError(f"{name} exited:\n{child.log_tail()}")
                with contextlib.suppress(Exception):
                    async with http.post(f"{gw.http}/auth/authenticate",
                                         json={"username": "root", "password": "memphis",
                                               "token_expiry_in_minutes": 600},
                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        if resp.status == 200:
                            gw.jwt = (await resp.json())["jwt"]
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready:\n{child.log_tail()}")
                await asyncio.sleep(0.1)
        yield gw
    finally:
        child.stop()


def auth_headers(gw: Gateway) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {gw.jwt}"}


async def post_many(gw: Gateway, requests: Sequence[tuple[str, bytes]], concurrency: int = 20) -> None:
    """POST each (path, body), a few at a time; every answer must be 200 (creates stations and groups)."""
    import aiohttp

    queue = list(reversed(requests))
    async with aiohttp.ClientSession(headers=auth_headers(gw)) as http:

        async def worker() -> None:
            while queue:
                path, body = queue.pop()
                async with http.post(gw.http + path, data=body) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise RuntimeError(f"POST {path}: HTTP {resp.status} {text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- one point ------------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    grid: Grid
    work: Path
    broker: Any
    js: Any
    log: Callable[[str], None]
    scripts: int = 0

    def script(self, body: bytes, headers: dict[str, str], paths: Sequence[str],
               bodies: Sequence[bytes] | None = None) -> Path:
        """A wrk script POSTing ``body`` to ``paths`` in turn (and ``bodies`` in turn, if given)."""
        self.scripts += 1
        body_path = self.work / f"curve-body-{self.scripts}.bin"
        body_path.write_bytes(body)
        lua = wrk_script(body_path, headers)
        lua += "local paths = {" + ",".join(_lua_str(p) for p in paths) + "}\n"
        if bodies:
            lua += "local bodies = {" + ",".join(_lua_str(b.decode()) for b in bodies) + "}\n"
        else:
            lua += "local bodies = nil\n"
        lua += ("local n = 0\n"
                "request = function()\n"
                "  n = n + 1\n"
                "  local b = nil\n"
                "  if bodies then b = bodies[(n % #bodies) + 1] end\n"
                "  return wrk.format(nil, paths[(n % #paths) + 1], nil, b)\n"
                "end\n")
        path = self.work / f"curve-{self.scripts}.lua"
        path.write_text(lua)
        return path

    async def wrk(self, base: str, script: Path, conns: int, seconds: int) -> dict[str, Any]:
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), base]
        fin = await asyncio.to_thread(run_measured, argv, timeout=seconds + 30, cpus=None, pinning=NO_PIN)
        try:
            r = _result_json(fin.stdout)
        except RuntimeError as exc:
            raise RuntimeError(f"wrk failed: {exc}\n{fin.stderr[-1000:]}") from None
        r["client_cpu_s"] = fin.cpu_s
        return r

    async def settle(self, gw: Gateway, limit_s: float = 5.0) -> None:
        """Until the gateway and nats-server are idle (calls abandoned at wrk's deadline)."""
        meters = [TreeCpu(gw.pid), TreeCpu(self.broker.pid)]
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            c0 = sum(m.cpu() for m in meters)
            await asyncio.sleep(0.25)
            if (sum(m.cpu() for m in meters) - c0) / 0.25 < 0.1:
                return

    async def point(self, gw: Gateway, x: float, script: Path, conns: int,
                    delivered: Callable[[], Any] | None = None, msg_bytes: int | None = None,
                    extra_s: int = 0) -> Point:
        """Warm up, then measure one load; ``delivered`` (async) counts messages at the broker instead of
        requests."""
        if self.grid.warmup:
            with contextlib.suppress(Exception):
                await self.wrk(gw.http, script, conns, self.grid.warmup + extra_s)
            await self.settle(gw)
        rss = PeakRss(gw.pid).start()
        gw_cpu, nats_cpu = TreeCpu(gw.pid), TreeCpu(self.broker.pid)
        c_gw, c_nats, c_self = gw_cpu.cpu(), nats_cpu.cpu(), time.process_time()
        busy0, t0 = cpus_busy_s(all_cpus()), time.monotonic()
        before = await delivered() if delivered else 0
        r = await self.wrk(gw.http, script, conns, self.grid.seconds + extra_s)
        after = await delivered() if delivered else 0
        wall = time.monotonic() - t0
        used_gw, used_nats = gw_cpu.cpu() - c_gw, nats_cpu.cpu() - c_nats
        busy = cpus_busy_s(all_cpus()) - busy0
        ours = used_gw + used_nats + r["client_cpu_s"] + time.process_time() - c_self
        peak = await rss.stop()
        elapsed = r["duration_us"] / 1e6
        ok = int(r["requests"]) - int(r["status_errors"])
        rate = (after - before) / elapsed if delivered else ok / elapsed
        errors = int(r["errors"]) + int(r["status_errors"])
        point = Point(x=x, rate=rate, p99_ms=r["p99_us"] / 1000 if ok else None, rss_mb=peak / 2**20,
                      gw_cpu=used_gw / wall, others=max(0.0, (busy - ours) / wall) if busy > 0 else None,
                      errors=errors, mb_s=rate * msg_bytes / 1e6 if msg_bytes else None)
        self.log(f"  {human(x)}: {rate:,.0f}/s p99 {point.p99_ms or math.nan:.1f} ms, RSS {point.rss_mb:.0f} MB, "
                 f"gateway {point.gw_cpu:.0%} CPU, others {point.others or 0:.0%}, errors {errors}")
        await self.settle(gw)
        return point

    async def purge(self, station: str) -> None:
        with contextlib.suppress(Exception):
            await self.js.purge_stream(f"{station}$1")


# -- the curves -----------------------------------------------------------------------------

SINGLE = "/stations/{}/produce/single"


async def curve_size(b: Bench, gw: Gateway) -> list[Point]:
    station = "curve_size"
    await post_many(gw, [(SINGLE.format(station), payload())])
    out = []
    for size in b.grid.sizes:
        script = b.script(payload(size), auth_headers(gw), [SINGLE.format(station)])
        out.append(await b.point(gw, size, script, 50, msg_bytes=size))
        await b.purge(station)  # 1 MB messages fill the disk quickly
    return out


async def curve_conns(b: Bench, gw: Gateway) -> list[Point]:
    station = "curve_conns"
    await post_many(gw, [(SINGLE.format(station), payload())])
    script = b.script(payload(), auth_headers(gw), [SINGLE.format(station)])
    out = []
    for conns in b.grid.conns:
        # Thousands of connects at once overflow the gateway's listen backlog (aiohttp's default, 128):
        # the kernel drops the handshakes and the clients retry after a second; give them time.
        out.append(await b.point(gw, conns, script, conns, extra_s=2 if conns > 200 else 0))
        await b.purge(station)
    return out


async def curve_stations(b: Bench, gw: Gateway) -> list[Point]:
    most = max(b.grid.stations)
    names = [f"curve_st{i}" for i in range(most)]
    t0 = time.monotonic()
    await post_many(gw, [(SINGLE.format(n), payload()) for n in names])
    b.log(f"  created {most} stations in {time.monotonic() - t0:.1f} s")
    out = []
    for n in b.grid.stations:
        script = b.script(payload(), auth_headers(gw), [SINGLE.format(s) for s in names[:n]])
        out.append(await b.point(gw, n, script, 50))
    for s in names:
        await b.purge(s)
    return out


async def curve_groups(b: Bench, gw: Gateway, nc: Any) -> list[Point]:
    station = "curve_groups"
    await post_many(gw, [(SINGLE.format(station), payload())])
    await prefill(nc, b.js, f"{station}$1", f"{station}$1.final", b.grid.consume_prefill, MEMPHIS_HEADERS)
    path = f"/stations/{station}/consume/batch"
    out = []
    for index, n in enumerate(b.grid.groups):
        groups = [f"cg{index}_{i}" for i in range(n)]
        bodies = [json.dumps({"consumer_name": "c", "consumer_group": g, "batch_size": 100,
                              "batch_max_wait_time_ms": 200}).encode() for g in groups]
        # create the groups first (one message each), so the point measures consuming, not creating
        await post_many(gw, [(path, json.dumps({**json.loads(body), "batch_size": 1}).encode()) for body in bodies])
        script = b.script(bodies[0], auth_headers(gw), [path], bodies)

        async def delivered(wanted: frozenset[str] = frozenset(groups)) -> int:
            total = 0
            for info in await b.js.consumers_info(f"{station}$1"):
                # the durable is named after the group ("<group>-rest-gateway"); these names have no "-"
                if (info.name or info.config.durable_name or "").lower().split("-", 1)[0] in wanted:
                    total += int(info.delivered.consumer_seq)
            return total

        out.append(await b.point(gw, n, script, 10, delivered=delivered))
    return out


async def curve_workers(b: Bench) -> list[Point]:
    out = []
    for n in b.grid.workers:
        extra = ["--workers", str(n)] if n > 1 else []
        async with gateway(b.broker.url, b.work, f"gateway-workers{n}", *extra) as gw:
            station = f"curve_workers{n}"
            await post_many(gw, [(SINGLE.format(station), payload())])
            script = b.script(payload(), auth_headers(gw), [SINGLE.format(station)])
            out.append(await b.point(gw, n, script, 50))
    return out


async def idle_connections(b: Bench, long_poll: bool) -> list[Idle]:
    """Open N connections (cumulative steps); each sends one request: a produce that is answered
    (then the connection idles), or a consume that waits on an empty station (a long poll)."""
    kind = "poll" if long_poll else "conn"
    out: list[Idle] = []
    # Longer than the defaults (15 s keep-alive, 30 s request deadline), so that nothing is answered
    # or closed while the steps run; memory and CPU per idle item are what is measured.
    keep = ["--http-keepalive-s", "600", "--request-timeout-s", "600", "--max-consume-wait-ms", "300000",
            "--drain-timeout-s", "1"]
    async with gateway(b.broker.url, b.work, f"gateway-idle-{kind}", *keep) as gw:
        station = f"curve_idle_{kind}"
        await post_many(gw, [(SINGLE.format(station), payload())])
        if long_poll:
            await b.purge(station)
            path = f"/stations/{station}/consume/batch"
            body = json.dumps({"consumer_name": "c", "consumer_group": "idle", "batch_size": 10,
                               "batch_max_wait_time_ms": 300_000}).encode()
            await post_many(gw, [(path, json.dumps({"consumer_name": "c", "consumer_group": "idle", "batch_size": 1,
                                                    "batch_max_wait_time_ms": 10}).encode())])
        else:
            path, body = SINGLE.format(station), payload()
        host, port = HOST, int(gw.http.rsplit(":", 1)[1])
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {gw.jwt}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        writers: list[asyncio.StreamWriter] = []

        async def open_one() -> None:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head)
            await writer.drain()
            if not long_poll:
                status = await reader.readline()
                if b" 200 " not in status:
                    raise RuntimeError(f"idle connection: {status!r}")
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass  # headers; the small JSON body stays unread in the socket
            writers.append(writer)

        await asyncio.sleep(1.0)
        try:
            for n in b.grid.idle:
                while len(writers) < n:
                    batch = min(100, n - len(writers))
                    await asyncio.gather(*(open_one() for _ in range(batch)))
                await asyncio.sleep(1.0)  # the gateway settles (buffers freed, tasks parked)
                cpu = TreeCpu(gw.pid)
                c0, t0 = cpu.cpu(), time.monotonic()
                await asyncio.sleep(2.0)
                used = (cpu.cpu() - c0) / (time.monotonic() - t0)
                rss = process_tree_rss(gw.pid)
                out.append(Idle(n=n, rss_mb=rss / 2**20, gw_cpu=used))
                b.log(f"  {n} idle {'long polls' if long_poll else 'connections'}: RSS {rss / 2**20:.1f} MB, "
                      f"gateway {used:.1%} of a core")
        finally:
            for w in writers:
                w.close()
    return out


# -- the picture ----------------------------------------------------------------------------

TITLES = {
    "size": ("message size (bytes)", "REST produce/single, 50 conns"),
    "conns": ("concurrent connections", "REST produce/single, 256 B"),
    "stations": ("stations in use", "REST produce/single, 50 conns, 256 B"),
    "groups": ("consumer groups", "REST consume/batch(100), 10 conns (msg/s)"),
    "workers": ("--workers", "REST produce/single, 50 conns, 256 B"),
}


def human(x: float) -> str:
    """64, 4K, 1M (powers of 1024 for sizes; plain below 1024)."""
    for unit, div in (("M", 2**20), ("K", 2**10)):
        if x >= div and x % div == 0:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def draw(res: Results, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [k for k in TITLES if res.curves.get(k)]
    rows = len(curves) + (1 if res.idle else 0)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 3.2 * rows + 1.2), squeeze=False)
    for row, key in enumerate(curves):
        pts = res.curves[key]
        xs = [p.x for p in pts]
        xlabel, what = TITLES[key]
        log_x = key in ("size", "conns", "stations", "groups") and max(xs) / max(min(xs), 1) >= 50
        for col, (label, ys) in enumerate((
            ("throughput (/s)", [p.rate for p in pts]),
            ("p99 (ms)", [p.p99_ms if p.p99_ms is not None else math.nan for p in pts]),
            ("gateway RSS, peak (MB)", [p.rss_mb for p in pts]),
        )):
            ax = axes[row][col]
            ax.plot(xs, ys, "o-", color=("tab:blue", "tab:red", "tab:green")[col])
            if key == "size" and col == 0:
                ax2 = ax.twinx()
                ax2.plot(xs, [p.mb_s or 0 for p in pts], "s--", color="tab:purple", alpha=0.7)
                ax2.set_ylabel("MB/s", color="tab:purple")
            if log_x:
                ax.set_xscale("log")
            if key == "workers":
                ax.set_xticks(xs)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if col == 0:
                ax.set_title(what, fontsize=9, loc="left")
            noisy = [p.x for p in pts if p.others is not None and p.others >= 0.15]
            if noisy and col == 0:
                ax.set_title(f"{what}\nothers >= 0.15 core at x = {', '.join(human(x) for x in noisy)}",
                             fontsize=8, loc="left")
    if res.idle:
        row = rows - 1
        for col, (kind, label) in enumerate((("connections", "idle keep-alive connections"),
                                             ("long_polls", "idle long polls (consume/batch)"))):
            ax = axes[row][col]
            idle = res.idle.get(kind, [])
            if not idle:
                ax.axis("off")
                continue
            ax.plot([p.n for p in idle], [p.rss_mb for p in idle], "o-", color="tab:green")
            kb = slope_kb(idle)
            ax.set_title(f"{label}: {kb:.1f} KiB each" if kb is not None else label, fontsize=9, loc="left")
            ax.set_xlabel(label)
            ax.set_ylabel("gateway RSS (MB)")
            ax.grid(True, alpha=0.3)
        ax = axes[row][2]
        for kind, style in (("connections", "o-"), ("long_polls", "s-")):
            idle = res.idle.get(kind, [])
            if idle:
                ax.plot([p.n for p in idle], [p.gw_cpu * 100 for p in idle], style, label=kind.replace("_", " "))
        ax.set_xlabel("idle connections / long polls")
        ax.set_ylabel("gateway CPU while idle (% of a core)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    meta = res.meta
    title = (f"memphis-gateway scaling curves ({meta.get('grid')}) - {meta.get('date')}, {meta.get('cpus')} CPUs, "
             f"{meta.get('python')}; loopback, unpinned, default settings (INFO); {meta.get('seconds')} s per point")
    if meta.get("reduced"):
        title = "REDUCED GRID, INDICATIVE RUN on a shared machine - " + title
    fig.suptitle(title + f"\ncommand: {meta.get('command')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png, dpi=90)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


async def amain(a: argparse.Namespace) -> int:
    import signal

    from gateway.embedded.server import EmbeddedBroker

    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    if shutil.which("wrk") is None:
        raise SystemExit("bench/curves.py needs wrk (apt-get install -y wrk)")
    grid = Grid.small() if a.reduced else Grid.full()
    only = [c.strip() for c in a.only.split(",") if c.strip()] or list(CURVES)
    unknown = set(only) - set(CURVES)
    if unknown:
        raise SystemExit(f"--only: unknown curve(s) {', '.join(sorted(unknown))}; known: {', '.join(CURVES)}")
    need_fds = 2 * max(max(grid.conns), max(grid.idle)) + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need_fds:  # children (gateway, wrk) inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need_fds, hard), hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit < need_fds:
        grid = _capped(grid, (limit - 200) // 2)
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    out_dir = Path(a.out) if a.out else HERE
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memgw-curves-"))
    res = Results(meta={
        "grid": "reduced grid" if grid.reduced else "full grid", "reduced": grid.reduced,
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": len(all_cpus()), "python": platform.python_version(),
        "seconds": grid.seconds, "warmup": grid.warmup, "fd_limit": limit,
        "command": "python bench/curves.py" + (" --reduced" if a.reduced else "")
                   + (f" --only {a.only}" if a.only else ""),
        "load": "wrk -t1, keep-alive, loopback; 256-byte JSON messages unless the curve varies the size",
    })
    broker = EmbeddedBroker(data_dir=work / "nats", port=0, root_user="root", root_password="memphis")
    try:
        await broker.start()
        nc = await connect(broker.url, pending_size=16 * 1024 * 1024)
        js = nc.jetstream(timeout=10)
        b = Bench(grid, work, broker, js, log)
        try:
            if {"size", "conns", "stations", "groups"} & set(only):
                async with gateway(broker.url, work, "gateway") as gw:
                    for key, run in (("size", curve_size), ("conns", curve_conns), ("stations", curve_stations)):
                        if key in only:
                            log(f"curve {key}")
                            res.curves[key] = await run(b, gw)
                    if "groups" in only:
                        log("curve groups")
                        res.curves["groups"] = await curve_groups(b, gw, nc)
            if "workers" in only:
                log("curve workers")
                res.curves["workers"] = await curve_workers(b)
            if "idle" in only:
                log("idle connections")
                res.idle["connections"] = await idle_connections(b, long_poll=False)
                log("idle long polls")
                res.idle["long_polls"] = await idle_connections(b, long_poll=True)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
    finally:
        await broker.stop()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res.meta["total_s"] = round(time.monotonic() - t_start)
    (out_dir / "curves.json").write_text(json.dumps(res.to_json(), indent=1) + "\n")
    draw(res, out_dir / "curves.png")
    log(f"wrote {out_dir / 'curves.png'} and {out_dir / 'curves.json'} in {res.meta['total_s']} s")
    for kind, pts in res.idle.items():
        kb = slope_kb(pts)
        if kb is not None:
            print(f"memory per idle {kind.replace('_', ' ')[:-1]}: {kb:.1f} KiB")
    return 0


def _capped(grid: Grid, most: int) -> Grid:
    from dataclasses import replace

    return replace(grid, conns=tuple(c for c in grid.conns if c <= most) or (1,),
                   idle=tuple(n for n in grid.idle if n <= most) or (0,))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="a few points per curve, 1 s each (~1.5 min)")
    p.add_argument("--only", default="", metavar="CURVES", help=f"comma-separated, of {', '.join(CURVES)}")
    p.add_argument("--out", default="", metavar="DIR", help="where to write curves.png and curves.json "
                   "(default: bench/)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    a = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        sys.exit(runner(amain(a)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted: everything the benchmark started was stopped")


if __name__ == "__main__":
    main()
