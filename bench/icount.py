"""Instructions per request, counted by valgrind's callgrind: a cost figure that noise cannot move.

    python bench/icount.py                                   # the gateway at its default (INFO) and at WARNING
    python bench/icount.py --requests 5000 --variant info= --variant "warn=--log-level WARNING"
    python bench/icount.py --variant "old=@/path/to/other/checkout" --variant new=   # two builds
    python bench/icount.py --baseline --variant gw=          # baseline B first: the gateway's cost as a ratio of B's
    python bench/icount.py --variant jwt= --variant key=+key --variant "limits=--rate-limit-rps 1000000" \
        --variant "no headers=+noheaders"                    # what each security feature costs a request

On a shared machine req/s moves by +-30% from one run to the next; the number of instructions the
gateway executes per request does not. Each variant starts a gateway under ``valgrind
--tool=callgrind --instr-atstart=no`` (on a loopback nats-server of its own), warms it up with
300 requests, switches counting on (``callgrind_control -i on``), sends N REST produce/single
requests (20 keep-alive connections, a JWT and a mapped header, 256-byte messages, like
bench/run.py), waits for the access-log flusher's next pass, switches counting off and prints
the instructions of all the gateway's threads divided by N. Instructions are not time: cache
misses are not counted (a per-call access line through ``logging`` cost 66k instructions but
about 40 us in the running gateway); use it to compare variants, and bench/run.py for the time.

A variant is ``NAME=EXTRA FLAGS[@CHECKOUT]``: flags appended to ``gateway serve``, and the checkout
whose ``gateway`` package runs (default: this one). Two pseudo-flags are this script's: ``+key``
sends an API key (created through the API) instead of the JWT, ``+noheaders`` leaves out the mapped
header (so the header checks and encoding are not run). Needs valgrind (apt-get install -y valgrind);
~1 min per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(_root), str(_root / "generated")]

from bench.common import HOST, ROOT, free_port, payload


async def send(port: int, jwt: str, n: int, conns: int = 20, station: str = "icount", headers: bool = True) -> None:
    """Exactly ``n`` POST produce/single over ``conns`` keep-alive connections; each must answer 200.

    ``jwt`` is the Authorization credential (a JWT or an API key); ``headers``: with the mapped header."""
    body = payload()
    mapped = "X-Bench-Trace: 4bf92f3577b34da6\r\n" if headers else ""
    request = (f"POST /stations/{station}/produce/single HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
               f"Content-Type: application/json\r\nAuthorization: Bearer {jwt}\r\n{mapped}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    left = [n]

    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while left[0] > 0:
                left[0] -= 1
                writer.write(request)
                status = await reader.readline()
                if b" 200 " not in status:
                    raise RuntimeError(f"gateway answered {status!r}")
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


async def count(broker_url: str, work: Path, name: str, extra: list[str], checkout: Path, n: int) -> int:
    import aiohttp

    # pseudo-flags of this script, not the gateway's: +key (an API key instead of the JWT), +noheaders
    use_key, with_headers = "+key" in extra, "+noheaders" not in extra
    extra = [f for f in extra if f not in ("+key", "+noheaders")]
    http_port, grpc_port = free_port(), free_port()
    out = work / f"callgrind-{name}.%p"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), str(checkout / "generated")]))
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "gateway", "serve", "--broker", broker_url, "--control-plane", "--host", HOST,
            "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--root-user", "root",
            "--root-password", "memphis", "--jwt-secret", "icount-" + "x" * 40, *extra]
    log_path = work / f"{name}.log"
    proc = _start(argv, env, work, log_path)
    try:
        jwt = ""
        deadline = time.monotonic() + 180
        async with aiohttp.ClientSession() as http:
            while not jwt:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: the gateway did not start:\n{log_path.read_text()[-2000:]}")
                with contextlib.suppress(Exception):
                    async with http.post(f"http://{HOST}:{http_port}/auth/authenticate",
                                         json={"username": "root", "password": "memphis"}) as resp:
                        if resp.status == 200:
                            jwt = (await resp.json())["jwt"]
                await asyncio.sleep(0.3)
            if use_key:
                async with http.post(f"http://{HOST}:{http_port}/api-keys", headers={"Authorization": f"Bearer {jwt}"},
                                     json={"name": "icount", "stations": ["icount"], "actions": ["produce"]}) as resp:
                    assert resp.status == 200, await resp.text()
                    jwt = (await resp.json())["key"]
        await send(http_port, jwt, 300, headers=with_headers)  # warm-up: the station, caches and pools
        await asyncio.to_thread(_instrument, proc.pid, "on")
        await send(http_port, jwt, n, headers=with_headers)
        await asyncio.sleep(0.6)  # the access log's flusher formats what the calls left (every 0.2 s)
        await asyncio.to_thread(_instrument, proc.pid, "off")
    finally:
        _stop(proc)
    return _totals(work, name)


async def count_baseline(broker_url: str, work: Path, n: int) -> int:
    """The same count for baseline B (bench/baselines.py rest: aiohttp + js.publish), the yardstick."""
    from bench.common import RAW_STREAM, connect, ensure_stream

    nc = await connect(broker_url)
    await ensure_stream(nc.jetstream(), RAW_STREAM)
    await nc.close()
    port = free_port()
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work / 'callgrind-B.%p'}",
            sys.executable, str(ROOT / "bench" / "baselines.py"), "rest", "--url", broker_url, "--port", str(port)]
    log_path = work / "B.log"
    proc = _start(argv, dict(os.environ), work, log_path)
    try:
        deadline = time.monotonic() + 180
        while b"READY" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"B did not start:\n{log_path.read_text()[-2000:]}")
            await asyncio.sleep(0.3)
        await send(port, "-", 300)
        await asyncio.to_thread(_instrument, proc.pid, "on")
        await send(port, "-", n)
        await asyncio.to_thread(_instrument, proc.pid, "off")
    finally:
        _stop(proc)
    return _totals(work, "B")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process under valgrind (it writes its counts on exit), SIGKILL if it hangs."""
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _start(argv: list[str], env: dict[str, str], work: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)


def _instrument(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)


def _totals(work: Path, name: str) -> int:
    """Instructions counted, from the callgrind output (the process's threads are in one file)."""
    total = 0
    for path in glob.glob(str(work / f"callgrind-{name}.*")):
        with open(path) as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    total = max(total, int(line.split()[1]))
    return total


async def amain(a: argparse.Namespace) -> int:
    from gateway.embedded.server import EmbeddedBroker

    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("bench/icount.py needs valgrind (apt-get install -y valgrind)")
    variants = a.variant or ["INFO (default)=", "WARNING=--log-level WARNING"]
    work = Path(tempfile.mkdtemp(prefix="memgw-icount-"))
    broker = EmbeddedBroker(data_dir=work / "nats", port=0, root_user="root", root_password="memphis")
    results: list[tuple[str, int]] = []
    try:
        await broker.start()
        if a.baseline:
            t0 = time.monotonic()
            total = await count_baseline(broker.url, work, a.requests)
            results.append(("B (minimal aiohttp)", total))
            print(f"B: {total / a.requests:,.0f} instructions per request ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        for spec in variants:
            name, _, rest = spec.partition("=")
            flags, _, checkout = rest.partition("@")
            t0 = time.monotonic()
            total = await count(broker.url, work, name.replace(" ", "_").replace("(", "").replace(")", ""),
                                shlex.split(flags), Path(checkout) if checkout else ROOT, a.requests)
            results.append((name, total))
            print(f"{name}: {total / a.requests:,.0f} instructions per request ({total:,} for {a.requests}; "
                  f"{time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        await broker.stop()
        if a.keep:
            print(f"callgrind files kept in {work} (callgrind_annotate <file>)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    base = results[0][1] / a.requests if results else 0
    print(f"\ninstructions per REST produce/single request (callgrind, all threads, {a.requests} requests):")
    for name, total in results:
        per = total / a.requests
        print(f"  {name:30s} {per:>10,.0f}  {per / base:.3f}x of {results[0][0]}" if base else f"  {name} {per}")
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests counted per variant (default 2000)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS[@CHECKOUT]",
                   help="a gateway to count (repeatable); default: INFO (no flag) and --log-level WARNING")
    p.add_argument("--keep", action="store_true", help="keep the callgrind files (for callgrind_annotate)")
    p.add_argument("--baseline", action="store_true",
                   help="count baseline B first (the minimal aiohttp handler); ratios are then against it")
    a = p.parse_args(argv)
    sys.exit(asyncio.run(amain(a)))


if __name__ == "__main__":
    main()
