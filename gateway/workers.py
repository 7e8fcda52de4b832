"""``--workers N`` (or ``auto``, one per CPU): N gateway processes sharing the REST and gRPC ports (SO_REUSEPORT).

The supervisor (this process) starts the embedded broker when there is no
``--broker``, then N children running ``memphis-gateway serve`` against it with
the same settings, the same JWT secret (through the environment, never the
command line) and the control plane answered by all of them (a NATS queue
group: one answers each request). The kernel spreads connections over the
children. SIGTERM/SIGINT are passed on; the supervisor exits when they have, so a stop
drains every worker.

They behave like one gateway:

- per-user limits are DIVIDED among the workers: each enforces ``rate_limit_rps / N``,
  ``rate_limit_bytes_per_s / N`` and ``ceil(max_streams_per_user / N)``, so a user whose
  connections spread over the workers gets the configured limit in total (one keep-alive
  connection stays on one worker and gets its share);
- ``/metrics`` sums every worker's calls, whichever worker a scrape reaches
  (``gateway.rpc.metrics_share``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from typing import Any

import nats

from gateway.auth.directory import Directory
from gateway.auth.tokens import TokenService
from gateway.broker_setup import embedded_broker, users_applier
from gateway.embedded.server import EmbeddedBroker
from gateway.settings import ENV_PREFIX, WORKER_GROUP_ENV, Settings, SettingsError

log = logging.getLogger("gateway.workers")
WORKER_ENV = ENV_PREFIX + "WORKER"  # set in children: they serve, they do not supervise


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def check(settings: Settings) -> None:
    if settings.http_port == 0 or settings.grpc_port == 0:
        raise SettingsError("workers: --workers > 1 needs fixed --http-port and --grpc-port (not 0)")


def child_environment(settings: Settings, broker_url: str, index: int, group: str) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.redacted().items():  # redacted: secrets are set below, explicitly
        env[ENV_PREFIX + name.upper()] = ",".join(value) if isinstance(value, tuple) else str(value)
    env[ENV_PREFIX + "BROKER"] = broker_url
    env[ENV_PREFIX + "CONTROL_PLANE"] = str(settings.answers_control_plane).lower()
    env[ENV_PREFIX + "ROOT_PASSWORD"] = settings.root_password
    env[ENV_PREFIX + "JWT_SECRET"] = settings.jwt_secret
    n = settings.workers
    env[ENV_PREFIX + "RATE_LIMIT_RPS"] = str(settings.rate_limit_rps / n)
    env[ENV_PREFIX + "RATE_LIMIT_BYTES_PER_S"] = str(settings.rate_limit_bytes_per_s / n)
    env[ENV_PREFIX + "MAX_STREAMS_PER_USER"] = str(-(-settings.max_streams_per_user // n))
    env[WORKER_ENV] = str(index)
    env[WORKER_GROUP_ENV] = group
    return env


def _die_with_parent() -> None:
    """In the child: SIGTERM when the supervisor dies, however it dies (Linux prctl)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _follow_users(settings: Settings, embedded: EmbeddedBroker) -> tuple[Directory, Any]:
    """The supervisor owns the nats-server, so it applies the users any worker writes (a KV watch, then a reload)."""
    nc = await nats.connect(embedded.url, user=f"{settings.root_user}$1", password=settings.root_password,
                            name="memphis-gateway::users", max_reconnect_attempts=-1)
    directory = Directory(TokenService(settings.jwt_secret), settings.root_user, managed=True)
    directory.broker_sync = users_applier(embedded)
    await directory.open(nc)
    await directory.sync_broker()
    return directory, nc


async def supervise(settings: Settings) -> int:
    check(settings)
    embedded = None
    broker_url = settings.broker
    if settings.embedded:
        embedded = embedded_broker(settings)
        await embedded.start()
        broker_url = embedded.url
        log.info("broker: embedded nats-server pid %s at %s, shared by %d workers", embedded.pid, broker_url,
                 settings.workers)
    group = f"{os.getpid()}-{secrets.token_hex(4)}"
    users = await _follow_users(settings, embedded) if embedded is not None else None
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env=child_environment(settings, broker_url, i, group),
            preexec_fn=_die_with_parent,
        )
        for i in range(settings.workers)
    ]
    log.info("workers: %s", ", ".join(str(c.pid) for c in children))
    loop = asyncio.get_running_loop()

    def forward(signum: int) -> None:
        for child in children:
            if child.returncode is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, forward, signum)
    codes = await asyncio.gather(*(c.wait() for c in children))
    if users is not None:
        directory, nc = users
        await directory.close()
        await nc.close()
    if embedded is not None:
        await embedded.stop()
    log.info("workers exited: %s", codes)
    return 0 if all(code == 0 for code in codes) else 1
