"""NATS helpers the broker package needs beyond nats-py: server lists, probes, pings, races."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats
import nats.js.errors

from gateway.core.deadlines import timeout
from gateway.core.errors import Unauthenticated, Unavailable
from gateway.core.identity import Credentials

T = TypeVar("T")
RETRY_AFTER_S = 1.0
RECONNECT_WAIT_S = 0.5  # between reconnect attempts to one server: the recovery delay after a restart
DOWN_SHORT = "the connection to the broker is lost and being re-established"
DOWN = f"broker unavailable: {DOWN_SHORT}; retry shortly"


def parse_servers(url: str) -> list[tuple[str, int]]:
    """``nats://h1:p1,h2:p2`` (scheme optional, default port 6666) as (host, port) pairs."""
    servers = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        parts = urlsplit(part if "://" in part else f"nats://{part}")
        host = parts.hostname or "127.0.0.1"
        servers.append(("127.0.0.1" if host == "localhost" else host, parts.port or 6666))  # localhost: +1 s
    return servers or [("127.0.0.1", 6666)]


async def unless_lost(call: Awaitable[T], lost: asyncio.Future[None]) -> T:
    """``await call``, or Unavailable as soon as the connection drops (nats-py would wait out its timeout)."""
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # our caller gave up
        abandon_task(task)
        raise
    if not task.done():
        abandon_task(task)
        raise Unavailable(DOWN, retry_after=RETRY_AFTER_S)
    return task.result()


def abandon_task(task: asyncio.Future[Any]) -> None:
    """Cancel, and retrieve whatever it ends with (nats-py may turn the cancellation into an error)."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def ping(nc: Any, seconds: float, lost: asyncio.Future[None] | None = None) -> bool:
    """PING, and whether the PONG came within ``seconds`` (and before ``lost``).

    Instead of nats-py's flush(): on a timeout or a cancellation it cancels its PONG future,
    still queued, and the late PONG then raises InvalidStateError in the connection's read
    loop, which drops the connection. This PONG future is never cancelled."""
    if not nc.is_connected:
        return False
    pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    try:
        await nc._send_ping(pong)
    except Exception:
        return False
    waits: tuple[asyncio.Future[Any], ...] = (pong,) if lost is None else (pong, lost)
    await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    return pong.done()


def tls_files(tls: tuple[str, str, str] | None) -> dict[str, str]:
    """memphis-py's connect keywords for TLS with a client certificate ({} for plain TCP)."""
    return {} if tls is None else {"cert_file": tls[0], "key_file": tls[1], "ca_file": tls[2]}


def tls_failure(
    exc: BaseException, address: str, tls: tuple[str, str, str] | None, *, suspect_closed: bool = False
) -> str | None:
    """What an operator must fix when a TLS handshake with the broker failed (None: ``exc`` is no TLS error).

    A broker that requires TLS is reached with TLS even without a certificate configured (nats-py follows
    the server's ``tls_required``), so a failed handshake without one means the files are missing. With
    TLS 1.3 a refused client certificate may show as a closed connection only: ``suspect_closed`` names the
    certificate as the likely cause then (for a log; a closed connection may be transient too)."""
    closed = ("connection lost", "connection reset", "broken pipe")
    if suspect_closed and tls is not None and any(word in str(exc).lower() for word in closed):
        return (f"the broker at {address} closed the connection while it was being opened ({exc}): with TLS, it "
                f"may refuse the client certificate {tls[0]} (CLIENT_CERT_PATH, --broker-tls-cert); check that a CA "
                "the broker trusts signed it")
    if not isinstance(exc, ssl.SSLError) and "[SSL: " not in str(exc):  # memphis-py keeps the text only
        return None
    if tls is None:
        return (f"TLS handshake with the broker at {address} failed ({exc}): the broker requires TLS, and no client "
                "certificate is configured: set CLIENT_CERT_PATH, CLIENT_KEY_PATH and ROOT_CA_PATH (or "
                "--broker-tls-cert, --broker-tls-key, --broker-tls-ca), all three")
    return (f"TLS handshake with the broker at {address} failed ({exc}): check that the client certificate "
            f"{tls[0]} (CLIENT_CERT_PATH, --broker-tls-cert) is signed by a CA the broker trusts, and that {tls[2]} "
            "(ROOT_CA_PATH, --broker-tls-ca) holds the CA that signed the broker's certificate")


def tls_context(tls: tuple[str, str, str] | None) -> ssl.SSLContext | None:
    """nats-py's ``tls`` for the same files, built as memphis-py builds it (TLS >= 1.2, the CA checked)."""
    if tls is None:
        return None
    ctx = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=tls[2])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=tls[0], keyfile=tls[1])
    return ctx


async def check_token(
    host: str, port: int, creds: Credentials, seconds: float, tls: tuple[str, str, str] | None = None
) -> None:
    """Unauthenticated if the broker refuses the connection token (one attempt, no reconnects)."""

    async def quiet(_exc: Exception) -> None:
        return None

    try:
        nc = await nats.connect(f"{'tls' if tls else 'nats'}://{host}:{port}", token=creds.connection_token,
                                allow_reconnect=False, connect_timeout=seconds, max_reconnect_attempts=0,
                                error_cb=quiet, tls=tls_context(tls), tls_hostname=host if tls else None)
    except Exception as exc:
        if "authorization" in str(exc).lower():
            raise Unauthenticated(f"broker refused the connection token of {creds.username}",
                                  why="credentials refused by the broker") from None
        return  # anything else: memphis-py's own connect reports it
    await nc.close()


async def probe(host: str, port: int, seconds: float) -> str | None:
    """None when a NATS server answers at host:port, else why not (refused, silent, not NATS)."""
    try:
        async with timeout(seconds):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return f"no answer within {seconds:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None if line.startswith(b"INFO ") else "not a NATS server"


PULL_GRACE_S = 0.25  # beyond its expiry, how long a pull waits for the broker's closing status
_PULL_ENDED = ("404", "408", "409")  # no messages, request expired, request ended (max_bytes reached, ...)


async def pull(psub: Any, batch: int, max_bytes: int, wait_s: float) -> list[Any]:
    """One pull request of a JetStream pull subscription for at most ``batch`` messages and
    ``max_bytes`` bytes (0: no limit), waiting up to ``wait_s`` for them.

    nats-py's ``fetch()`` cannot say ``max_bytes``, so a fetch of large messages made nats-server
    push batch x size bytes at once down the user's connection: 40 x 7 MB tripped its
    slow-consumer limit and it cut the connection every call of that user shares. Messages
    left in the subscription's queue by an earlier request come first. ``max_bytes`` must exceed
    the largest message (the broker would otherwise refuse to deliver it, for good)."""
    sub = psub._sub
    queue = sub._pending_queue
    out: list[Any] = []
    while not queue.empty() and len(out) < batch:
        msg = queue.get_nowait()
        queue.task_done()  # (a subscription's drain waits for every message to be done)
        sub._pending_size -= len(msg.data)
        if not (msg.headers and msg.headers.get("Status")):  # a leftover status ended an earlier request
            out.append(msg)
    if len(out) >= batch:
        return out
    request: dict[str, Any] = {"batch": batch - len(out)}
    if max_bytes:
        request["max_bytes"] = max_bytes
    expires_ns = int(wait_s * 1e9) - 100_000
    if out or expires_ns <= 1_000_000:
        request["no_wait"] = True
    else:
        request["expires"] = expires_ns
    await psub._nc.publish(psub._nms, json.dumps(request).encode(), psub._deliver)
    loop_deadline = time.monotonic() + (0.0 if "no_wait" in request else wait_s) + PULL_GRACE_S
    while len(out) < batch:
        remaining = loop_deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            async with timeout(remaining):
                msg = await queue.get()
        except TimeoutError:
            break
        queue.task_done()
        sub._pending_size -= len(msg.data)
        status = msg.headers.get("Status") if msg.headers else None
        if not status:
            out.append(msg)
        elif status in _PULL_ENDED:
            break
        elif status != "100":  # heartbeats are skipped
            raise nats.js.errors.APIError.from_msg(msg)
    return out
