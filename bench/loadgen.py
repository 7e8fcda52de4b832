"""Load generators: wrk (HTTP/1.1) and h2load (gRPC over h2c), else an in-benchmark asyncio client.

The ratio of two servers is meaningful only when the client is not the bottleneck, so the
C tools are preferred; each run reports the client's CPU time, so the table shows whether the
client had room to spare. The fallback (``python bench/loadgen.py http|grpc ...``) is a raw
asyncio HTTP/1.1 client and a grpc.aio client on uvloop; it is used only when wrk/h2load are
missing (or with ``--loadgen python``), and the table says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from bench.common import Finished, Pinning, python, run_measured

SELF = str(Path(__file__).resolve())


@dataclass(slots=True)
class LoadResult:
    tool: str
    requests: int  # completed with a 2xx status
    errors: int  # transport errors and non-2xx statuses
    elapsed_s: float
    p50_ms: float | None
    p99_ms: float | None
    client_cpu_s: float
    wall_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def client_cpu(self) -> float:
        """Fraction of one core the load generator used."""
        return self.client_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Tools:
    http: str  # "wrk" or "python"
    grpc: str  # "h2load" or "python"

    @classmethod
    def detect(cls, preference: str) -> Tools:
        if preference == "python":
            return cls("python", "python")
        http = "wrk" if shutil.which("wrk") else "python"
        grpc = "h2load" if shutil.which("h2load") else "python"
        if preference == "native" and (http, grpc) != ("wrk", "h2load"):
            raise SystemExit("--loadgen native: wrk and h2load are required (apt-get install -y wrk nghttp2-client)")
        return cls(http, grpc)

    def describe(self) -> str:
        parts = []
        parts.append("REST: wrk (C, 1 thread)" if self.http == "wrk" else
                     "REST: in-benchmark asyncio HTTP/1.1 client (wrk not found: install it for trustworthy ratios)")
        parts.append("gRPC: h2load (C, 1 thread, h2c)" if self.grpc == "h2load" else
                     "gRPC: in-benchmark grpc.aio client (h2load not found: install nghttp2-client)")
        return "; ".join(parts)


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def wrk_script(body_path: Path, headers: Mapping[str, str]) -> str:
    lines = [
        f"local f = assert(io.open({_lua_str(str(body_path))}, 'rb'))",
        "wrk.body = f:read('*a')",
        "f:close()",
        'wrk.method = "POST"',
    ]
    lines += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items()]
    lines.append(
        "function done(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        "  io.write(string.format('RESULT {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"status_errors\":%d,"
        "\"p50_us\":%d,\"p99_us\":%d}\\n', summary.requests, summary.duration, e.connect + e.read + e.write + "
        "e.timeout, e.status, latency:percentile(50), latency:percentile(99)))\n"
        "end"
    )
    return "\n".join(lines) + "\n"


def _result_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"load generator printed no result:\n{text[-2000:]}")


async def http_post(url: str, body_path: Path, headers: Mapping[str, str], *, conns: int, duration: float,
                    tool: str, pinning: Pinning, work_dir: Path, stop: threading.Event | None = None) -> LoadResult:
    """POST the body over ``conns`` keep-alive connections for ``duration`` seconds (or until ``stop``)."""
    if tool == "wrk":
        script = work_dir / f"wrk-{abs(hash((url, str(body_path), tuple(headers.items()))))}.lua"
        script.write_text(wrk_script(body_path, headers))
        secs = max(1, round(duration))
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "10s", "-s", str(script), url]
        fin = await asyncio.to_thread(run_measured, argv, timeout=secs + 20, cpus=pinning.client, pinning=pinning,
                                      stop_event=stop)
        r = _checked(fin, "wrk")
        requests = int(r["requests"]) - int(r["status_errors"])
        return LoadResult("wrk", requests, int(r["errors"]) + int(r["status_errors"]), r["duration_us"] / 1e6,
                          r["p50_us"] / 1000, r["p99_us"] / 1000, fin.cpu_s, fin.wall_s)
    argv = [python(), SELF, "http", "--url", url, "--body", str(body_path),
            "--conns", str(conns), "--duration", str(duration)]
    for k, v in headers.items():
        argv += ["--header", f"{k}: {v}"]
    fin = await asyncio.to_thread(run_measured, argv, timeout=duration + 30, cpus=pinning.client, pinning=pinning,
                                  stop_event=stop)
    r = _checked(fin, "asyncio client")
    return LoadResult("python", r["requests"], r["errors"], r["elapsed_s"], r["p50_ms"], r["p99_ms"], fin.cpu_s,
                      fin.wall_s)


async def grpc_call(target: str, method: str, body_path: Path, metadata: Mapping[str, str], *, kind: str,
                    conns: int, streams: int, duration: float, tool: str, pinning: Pinning) -> LoadResult:
    """Call ``method`` (``/pkg.Service/Method``) with the gRPC-framed request body in ``body_path``:
    one frame for ``kind="unary"``, many for ``kind="stream"`` (a client stream)."""
    if tool == "h2load":
        secs = max(1, round(duration))
        argv = ["h2load", "-t1", f"-c{conns}", f"-m{streams}", f"-D{secs}", "-d", str(body_path),
                "-H", "content-type: application/grpc", "-H", "te: trailers"]
        for k, v in metadata.items():
            argv += ["-H", f"{k}: {v}"]
        argv.append(f"http://{target}{method}")
        fin = await asyncio.to_thread(run_measured, argv, timeout=secs + 30, cpus=pinning.client, pinning=pinning)
        return _parse_h2load(fin)
    argv = [python(), SELF, "grpc", "--target", target, "--method", method,
            "--body", str(body_path), "--kind", kind, "--conns", str(conns), "--streams", str(streams),
            "--duration", str(duration)]
    for k, v in metadata.items():
        argv += ["--header", f"{k}: {v}"]
    fin = await asyncio.to_thread(run_measured, argv, timeout=duration + 30, cpus=pinning.client, pinning=pinning)
    r = _checked(fin, "grpc.aio client")
    return LoadResult("python", r["requests"], r["errors"], r["elapsed_s"], r["p50_ms"], r["p99_ms"], fin.cpu_s,
                      fin.wall_s)


def _checked(fin: Finished, name: str) -> dict[str, Any]:
    try:
        return _result_json(fin.stdout)
    except (RuntimeError, ValueError) as exc:
        raise RuntimeError(f"{name} failed (exit {fin.returncode}): {exc}\nstderr: {fin.stderr[-2000:]}") from None


_H2_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")
_H2_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                          r"(\d+) errored, (\d+) timeout")
_H2_STATUS = re.compile(r"status codes: (\d+) 2xx")
_H2_TIME = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _parse_h2load(fin: Finished) -> LoadResult:
    out = fin.stdout
    fm, rm, sm = _H2_FINISHED.search(out), _H2_REQUESTS.search(out), _H2_STATUS.search(out)
    if fm is None or rm is None or sm is None:
        raise RuntimeError(f"h2load failed (exit {fin.returncode}):\n{out[-2000:]}\n{fin.stderr[-2000:]}")
    elapsed = float(fm.group(1)) / (1000 if fm.group(2) == "ms" else 1)
    done, ok2xx = int(rm.group(3)), int(sm.group(1))
    tm = _H2_TIME.search(out)
    mean = _ms(tm.group(5), tm.group(6)) if tm else None
    # h2load counts a gRPC error (HTTP 200 + grpc-status != 0) as a success: the caller checks the broker.
    return LoadResult("h2load", ok2xx, done - ok2xx + int(rm.group(5)) + int(rm.group(6)), elapsed, mean, None,
                      fin.cpu_s, fin.wall_s)


def grpc_frames(messages: Sequence[bytes]) -> bytes:
    """gRPC length-prefixed framing (uncompressed) of serialized messages."""
    return b"".join(b"\x00" + struct.pack(">I", len(m)) + m for m in messages)


def _unframe(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack(">I", data[i + 1 : i + 5])
        out.append(data[i + 5 : i + 5 + n])
        i += 5 + n
    return out


# -- the fallback clients (run in their own process, pinned with the other load) ---------


def _percentiles(lat: list[float]) -> tuple[float | None, float | None]:
    if not lat:
        return None, None
    lat.sort()
    return lat[len(lat) // 2] * 1000, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000


def _stop_on_sigint(end: list[float]) -> None:
    """Like wrk: SIGINT ends the run early and the result is still printed."""
    import signal

    def stop() -> None:
        end[0] = 0.0

    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop)


async def _http_client(url: str, body: bytes, headers: list[tuple[str, str]], conns: int,
                       duration: float) -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    ok = errors = 0
    lat: list[float] = []
    t0 = time.monotonic()
    end = [t0 + duration]
    _stop_on_sigint(end)

    async def one() -> None:
        nonlocal ok, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.monotonic() < end[0]:
                s = time.monotonic()
                writer.write(request)
                status_line = await reader.readline()
                length, chunked = 0, False
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                    elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                        chunked = True
                if chunked:
                    while True:
                        size = int((await reader.readline()).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    await reader.readexactly(length)
                if status_line[9:10] == b"2":
                    ok += 1
                    lat.append(time.monotonic() - s)
                else:
                    errors += 1
        finally:
            writer.close()

    results = await asyncio.gather(*(one() for _ in range(conns)), return_exceptions=True)
    errors += sum(1 for r in results if isinstance(r, BaseException))
    elapsed = time.monotonic() - t0
    p50, p99 = _percentiles(lat)
    return {"requests": ok, "errors": errors, "elapsed_s": elapsed, "p50_ms": p50, "p99_ms": p99}


async def _grpc_client(target: str, method: str, body: bytes, metadata: list[tuple[str, str]], kind: str,
                       conns: int, streams: int, duration: float) -> dict[str, Any]:
    import grpc

    frames = _unframe(body)
    ok = errors = 0
    lat: list[float] = []
    t0 = time.monotonic()
    end = [t0 + duration]
    _stop_on_sigint(end)
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(conns)]

    async def one(channel: Any) -> None:
        nonlocal ok, errors
        if kind == "unary":
            call = channel.unary_unary(method)
        else:
            call = channel.stream_unary(method)
        while time.monotonic() < end[0]:
            s = time.monotonic()
            try:
                if kind == "unary":
                    await call(frames[0], metadata=metadata, timeout=30)
                else:
                    await call(iter(frames), metadata=metadata, timeout=60)
                ok += 1
                lat.append(time.monotonic() - s)
            except grpc.aio.AioRpcError:
                errors += 1

    await asyncio.gather(*(one(ch) for ch in channels for _ in range(streams)))
    elapsed = time.monotonic() - t0
    for ch in channels:
        await ch.close()
    p50, p99 = _percentiles(lat)
    return {"requests": ok, "errors": errors, "elapsed_s": elapsed, "p50_ms": p50, "p99_ms": p99}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="in-benchmark fallback load generator")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("http")
    h.add_argument("--url", required=True)
    g = sub.add_parser("grpc")
    g.add_argument("--target", required=True)
    g.add_argument("--method", required=True)
    g.add_argument("--kind", choices=("unary", "stream"), default="unary")
    g.add_argument("--streams", type=int, default=1)
    for s in (h, g):
        s.add_argument("--body", required=True)
        s.add_argument("--header", action="append", default=[])
        s.add_argument("--conns", type=int, default=10)
        s.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args(argv)
    body = Path(a.body).read_bytes()
    headers = [(k.strip(), v.strip()) for k, _, v in (x.partition(":") for x in a.header)]
    if a.cmd == "http":
        coro = _http_client(a.url, body, headers, a.conns, a.duration)
    else:
        coro = _grpc_client(a.target, a.method, body, [(k.lower(), v) for k, v in headers], a.kind, a.conns,
                            a.streams, a.duration)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:  # pragma: no cover
        result = asyncio.run(coro)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
