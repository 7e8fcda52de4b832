"""Command line: ``memphis-gateway serve [flags]`` (``--help`` lists every setting)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys

from gateway import logs, workers
from gateway import settings as config

log = logging.getLogger("gateway")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="memphis-gateway",
        description="REST (port 4444) and gRPC (port 50051) gateway for Memphis.dev stations.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. With no --broker it starts an embedded nats-server and answers "
        "Memphis's control plane itself. Flags override MEMPHIS_GATEWAY_* environment variables.",
    )
    config.add_arguments(serve)
    return parser.parse_args(argv)


async def serve(settings: config.Settings) -> int:
    from gateway.app import Gateway  # here: a --workers supervisor never serves, and is lighter without it

    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            # The operator wants out now: no more draining. The embedded broker still gets
            # its SIGTERM (half a second, then SIGKILL); JetStream survives either.
            log.warning("second signal (%s): exiting at once", name)
            if gateway.embedded is not None:
                gateway.embedded.terminate(wait_s=0.5)
            logging.shutdown()  # flushes the buffered log handler
            os._exit(128 + signum)
        log.info("%s: draining (up to %gs; a second SIGTERM or SIGINT exits at once)", name,
                 settings.drain_timeout_s)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await gateway.start()
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        await gateway.stop()
        return 1
    tune_gc()
    await stopping.wait()
    await gateway.stop()
    return 0


def tune_gc() -> None:
    """Once the gateway has started: its start-up objects (descriptors, modules: never garbage) leave
    the collector's generations, so no collection walks them again.

    The young generation keeps CPython's threshold. Under 50 calls in flight it collects every few
    milliseconds (400 collections in 8 s, 4% of the process's time) and frees nothing; a threshold of
    10,000-20,000 removed them, but then what refused broker logins leave in reference cycles
    (nats-py's clients, their sockets to the broker still open) waited that much longer: 100 logins
    left a dozen broker connections open, 5,000 failed ones 7 MB. Its gain in throughput was within
    this machine's noise (bench/README.md, "The garbage collector"), so the default stays."""
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    # JSON up to orjson's 1024 levels must not exhaust Python's recursion in the json decoders
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4000))
    args = parse(argv)
    try:
        settings = config.from_args(args)
    except config.SettingsError as exc:
        sys.exit(f"memphis-gateway: configuration error: {exc}")
    logs.configure(settings.log_level)
    for flag in config.secrets_given_as_flags(args):
        log.warning("%s on the command line is visible to every user of this machine (ps, /proc): use %s-file "
                    "or the environment variable MEMPHIS_GATEWAY_%s_FILE instead", flag, flag,
                    flag[2:].replace("-", "_").upper())
    if (why := settings.unsafe_embedded_password()) is not None:
        sys.exit(f"memphis-gateway: refusing to start: {why}")
    settings, generated = settings.with_generated_secret()
    if generated:
        log.warning(
            "no jwt_secret configured: generated a random one; tokens will not survive a restart "
            "and replicas will not accept each other's tokens (set MEMPHIS_GATEWAY_JWT_SECRET or JWT_SECRET)"
        )
    upstream, ours = config.names_read(settings)
    log.info("configuration read from: upstream variables %s; MEMPHIS_GATEWAY_* %s; flags win over both, "
             "ours over upstream's", ", ".join(upstream) or "none", ", ".join(ours) or "none")
    for warning in config.secret_warnings(settings):
        log.warning("%s", warning)
    log.info("settings: %s", {k: str(v) for k, v in settings.redacted().items()})
    if settings.workers > 1 and not workers.is_worker():
        try:
            workers.check(settings)
        except config.SettingsError as exc:
            sys.exit(f"memphis-gateway: configuration error: {exc}")
        sys.exit(asyncio.run(workers.supervise(settings)))
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        sys.exit(asyncio.run(serve(dataclasses.replace(settings))))
    sys.exit(uvloop.run(serve(dataclasses.replace(settings))))


if __name__ == "__main__":
    main()
