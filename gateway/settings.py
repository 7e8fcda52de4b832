"""Configuration: one typed settings object.

Sources, later ones winning: defaults, the upstream Memphis REST gateway's variable
names (``HTTP_PORT``, ``MEMPHIS_HOST``, ``JWT_SECRET``, ... read as it reads them:
docs/upstream.md, "Configuration"), our environment variables
(``MEMPHIS_GATEWAY_<FIELD>``, e.g. ``MEMPHIS_GATEWAY_HTTP_PORT=8080``), then command
line flags (``--http-port 8080``). A malformed value of ours stops start-up with the
variable's name in the message; an upstream value that does not convert is ignored
with a warning, as the upstream ignores it (silently). An empty value counts as unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gateway.upstream_env import upstream_values

ENV_PREFIX = "MEMPHIS_GATEWAY_"
WORKER_GROUP_ENV = ENV_PREFIX + "WORKER_GROUP"  # set by the --workers supervisor in its children
FILE_SUFFIX = "_FILE"  # MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE / --root-password-file: a secret read from a file
DEV_ROOT_PASSWORD = "memphis"
log = logging.getLogger("gateway.settings")
AUTH_MODES = ("auto", "password", "token")


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    # Listeners
    host: str = field(default="127.0.0.1", metadata={"help": "address both listeners bind (0.0.0.0 in containers)"})
    http_port: int = field(default=4444, metadata={"help": "REST port"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port"})
    workers: int = field(
        default=1, metadata={"help": "gateway processes sharing the ports (SO_REUSEPORT); auto: one per CPU"}
    )
    # Broker
    broker: str = field(
        default="",
        metadata={"help": "Memphis or NATS address host:port (or h1:p1,h2:p2); empty = embedded nats-server"},
    )
    broker_port: int = field(default=6666, metadata={"help": "client port of the embedded broker"})
    control_plane: bool = field(
        default=False,
        metadata={"help": "answer Memphis's control plane against --broker (a plain NATS JetStream server)"},
    )
    data_dir: Path = field(default=Path("data"), metadata={"help": "embedded broker's storage directory"})
    root_user: str = field(default="root", metadata={"help": "broker root user (embedded broker / control plane)"})
    root_password: str = field(
        default=DEV_ROOT_PASSWORD,
        metadata={"help": "broker root password (development default: memphis, loopback only)", "secret": True},
    )
    broker_max_streams: int = field(
        default=10_000, metadata={"help": "embedded broker: JetStream streams of the account (0: unlimited)"}
    )
    broker_max_consumers: int = field(
        default=100_000, metadata={"help": "embedded broker: JetStream consumers of the account (0: unlimited)"}
    )
    broker_max_memory_mb: int = field(
        default=1024, metadata={"help": "embedded broker: JetStream memory of the account, MiB (0: unlimited)"}
    )
    broker_max_store_mb: int = field(
        default=0, metadata={"help": "embedded broker: JetStream file storage of the account, MiB (0: unlimited)"}
    )
    max_stations_per_user: int = field(
        default=1000, metadata={"help": "stations one user may create by producing (0: off); 429 beyond"}
    )
    connection_token: str = field(
        default="",
        metadata={"help": "the broker's connection token (token mode; the embedded broker accepts it)", "secret": True},
    )
    auth_mode: str = field(
        default="auto",
        metadata={"help": "which credential counts: password, token (connection_token), or auto (the one sent; "
                  "password when both are)"},
    )
    broker_tls_cert: str = field(default="", metadata={"help": "client certificate (PEM) for TLS to the broker"})
    broker_tls_key: str = field(default="", metadata={"help": "its private key (PEM)"})
    broker_tls_ca: str = field(default="", metadata={"help": "CA (PEM) the broker's certificate is checked against"})
    broker_timeout_s: float = field(default=5.0, metadata={"help": "deadline of one broker operation (s)"})
    session_idle_s: float = field(default=300.0, metadata={"help": "close a user's broker connection unused this long"})
    # Tokens
    jwt_secret: str = field(
        default="",
        metadata={"help": "HS256 secret shared by replicas; generated (with a warning) if empty", "secret": True},
    )
    upstream_jwt_secret: str = field(
        default="",
        metadata={"help": "accept access tokens the upstream gateway signed with this secret (migration)",
                  "secret": True},
    )
    upstream_refresh_jwt_secret: str = field(
        default="",
        metadata={"help": "accept refresh tokens the upstream gateway signed with this secret (migration)",
                  "secret": True},
    )
    token_expiry_min: int = field(default=15, metadata={"help": "default access token lifetime (minutes)"})
    refresh_token_expiry_min: int = field(default=300, metadata={"help": "default refresh token lifetime (minutes)"})
    max_token_expiry_min: int = field(
        default=0, metadata={"help": "cap on requested token lifetimes, minutes (0: no cap, as upstream)"}
    )
    dev_env: bool = field(
        default=False, metadata={"help": "GET /monitoring/getResourcesUtilization without a token (upstream DEV_ENV)"}
    )
    # HTTP
    cors_origins: tuple[str, ...] = field(default=("*",), metadata={"help": "allowed CORS origins, comma separated"})
    request_timeout_s: float = field(default=30.0, metadata={"help": "deadline of a REST request or unary RPC (s)"})
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": "largest request body (bytes)"})
    body_read_timeout_s: float = field(
        default=10.0, metadata={"help": "a REST body not all received by then: 408, connection closed (s)"}
    )
    max_inflight_body_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"help": "REST request body bytes held at once across all requests; beyond: 503 + Retry-After"},
    )
    max_inflight_produce_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={"help": "produced messages awaiting the broker's acknowledgement, all calls, REST and gRPC "
                          "(bytes, 512 counted per message besides its own); beyond: 503 + Retry-After"},
    )
    max_batch_messages: int = field(default=5000, metadata={"help": "most messages in one produce batch"})
    max_consume_batch: int = field(default=5000, metadata={"help": "largest consume batch_size"})
    max_consume_wait_ms: int = field(default=60000, metadata={"help": "largest batch_max_wait_time_ms"})
    max_consume_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata={"help": "largest consume answer (bytes; gRPC also max_body_bytes); the rest waits for the next call"},
    )
    max_streams_per_user: int = field(default=16, metadata={"help": "concurrent streaming calls per user"})
    rate_limit_rps: float = field(default=0.0, metadata={"help": "requests/s per user (0: off); 429 beyond"})
    rate_limit_bytes_per_s: float = field(default=0.0, metadata={"help": "request bytes/s per user (0: off)"})
    login_failures_per_user_per_min: float = field(
        default=10.0, metadata={"help": "failed logins a minute per username, as many in a row (0: off); 429 beyond"}
    )
    login_failures_per_address_per_min: float = field(
        default=60.0, metadata={"help": "failed logins a minute per client address (0: off); 429 beyond"}
    )
    http_keepalive_s: float = field(default=15.0, metadata={"help": "close idle HTTP connections after (s)"})
    http_send_timeout_s: float = field(
        default=30.0, metadata={"help": "abort an HTTP connection whose client reads nothing for this long (s)"}
    )
    grpc_idle_s: float = field(default=300.0, metadata={"help": "close idle gRPC connections after (s)"})
    grpc_max_streams: int = field(
        default=100, metadata={"help": "concurrent calls (HTTP/2 streams) on one gRPC connection"}
    )
    grpc_max_connection_age_s: float = field(
        default=3600.0,
        metadata={"help": "close a gRPC connection after this long (with a grace period for its calls) (s)"},
    )
    drain_timeout_s: float = field(default=8.0, metadata={"help": "on SIGTERM, time given to calls in flight (s)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    @property
    def embedded(self) -> bool:
        return not self.broker

    @property
    def broker_url(self) -> str:
        if self.embedded:
            return f"nats://127.0.0.1:{self.broker_port}"
        address = self.broker.split("://", 1)[-1]
        return f"nats://{address}" if ":" in address else f"nats://{address}:6666"

    @property
    def broker_tls(self) -> tuple[str, str, str] | None:
        """(cert, key, ca) when all three are set: TLS with a client certificate to the broker."""
        files = (self.broker_tls_cert, self.broker_tls_key, self.broker_tls_ca)
        return files if all(files) else None

    @property
    def answers_control_plane(self) -> bool:
        return self.embedded or self.control_plane

    def unsafe_embedded_password(self) -> str | None:
        """Why the embedded broker must not start with these settings (None: it may): its
        development password on a listener other clients can reach."""
        if not self.embedded or self.root_password != DEV_ROOT_PASSWORD or is_loopback(self.host):
            return None
        return (
            f"the embedded broker's root password is the development default {DEV_ROOT_PASSWORD!r} while the "
            f"gateway listens on {self.host!r}, which other machines can reach: set a password with "
            "MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE (a file holding it) or MEMPHIS_GATEWAY_ROOT_PASSWORD "
            "(or --root-password-file), or listen on 127.0.0.1"
        )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs."""
        return {
            f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }

    def with_generated_secret(self) -> tuple[Settings, bool]:
        if self.jwt_secret:
            return self, False
        return dataclasses.replace(self, jwt_secret=secrets.token_urlsafe(48)), True


def worker_group() -> str:
    """The id shared by the workers of one ``--workers`` supervisor ("" outside one)."""
    return os.environ.get(WORKER_GROUP_ENV, "")
def is_loopback(host: str) -> bool:
    """``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def secret_fields() -> list[str]:
    return [f.name for f in fields(Settings) if f.metadata.get("secret")]


def read_secret_file(name: str, path: str) -> str:
    """The secret in ``path``, without its trailing newline."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{name}: cannot read the secret file {path!r}: {exc}") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise SettingsError(f"{name}: the secret file {path!r} is empty")
    return secret


def _convert(name: str, kind: Any, raw: str) -> Any:
    if name.lower().replace("-", "_").endswith("workers") and raw.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        if kind in (bool, "bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (Path, "Path"):
            return Path(raw)
        if kind in ("tuple[str, ...]",):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _validate(s: Settings) -> None:
    for port in ("http_port", "grpc_port", "broker_port"):
        if not 0 <= getattr(s, port) <= 65535:
            raise SettingsError(f"{port}: must be between 0 and 65535")
    for name in ("rate_limit_rps", "rate_limit_bytes_per_s", "login_failures_per_user_per_min",
                 "login_failures_per_address_per_min", "broker_max_streams", "broker_max_consumers",
                 "broker_max_memory_mb", "broker_max_store_mb", "max_stations_per_user"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name}: must be 0 (off) or positive")
    positive = (
        "workers", "max_streams_per_user", "broker_timeout_s", "token_expiry_min", "refresh_token_expiry_min",
        "request_timeout_s", "max_body_bytes", "max_batch_messages", "max_consume_batch", "max_consume_wait_ms",
        "session_idle_s", "http_keepalive_s", "http_send_timeout_s", "body_read_timeout_s", "max_inflight_body_bytes",
        "max_inflight_produce_bytes",
        "max_consume_bytes", "grpc_max_streams", "grpc_max_connection_age_s",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{name}: must be positive")
    if s.max_inflight_body_bytes < s.max_body_bytes:
        raise SettingsError("max_inflight_body_bytes: must be at least max_body_bytes")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError("log_level: must be DEBUG, INFO, WARNING or ERROR")
    if s.auth_mode not in AUTH_MODES:
        raise SettingsError(f"auth_mode: must be one of {', '.join(AUTH_MODES)}")
    if s.max_token_expiry_min < 0:
        raise SettingsError("max_token_expiry_min: must be 0 (no cap) or positive")
    tls = (s.broker_tls_cert, s.broker_tls_key, s.broker_tls_ca)
    if any(tls) and not all(tls):
        log.warning("broker TLS needs all three of the client certificate, its key and the CA; "
                    "only some are set, so the broker connection is plain TCP (as upstream)")


# The upstream gateway's variables (docs/upstream.md, "The variables"): name -> (our field, type).
# JWT_SECRET also keys our own tokens when ours is unset; USER_PASS_BASED_AUTH picks auth_mode;
# DEBUG raises the log level (we never log bodies); DEV_ENV is "true" exactly, as upstream compares it.
_last_read: list[tuple[str, ...]] = [(), ()]
SHORT_SECRET = 32  # characters; shorter HS256 secrets are accepted (upstream: any length) with a warning


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the environment, then ``overrides`` (parsed CLI flags)."""
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    values, upstream_read = upstream_values(environ)
    ours_read: list[str] = []
    for f in fields(Settings):
        env_name = ENV_PREFIX + f.name.upper()
        if environ.get(env_name, "") != "":
            values[f.name] = _convert(env_name, f.type, environ[env_name])
            ours_read.append(env_name)
    for name in secret_fields():  # a secret may come from a file (its path is all `ps` or the environment show)
        env_name, flag = ENV_PREFIX + name.upper(), "--" + name.replace("_", "-")
        env_file, flag_file = environ.get(env_name + FILE_SUFFIX), overrides.pop(name + "_file", None)
        if env_file is not None:
            if env_name in environ:
                raise SettingsError(f"{env_name} and {env_name}{FILE_SUFFIX}: set one of them")
            values[name] = read_secret_file(env_name + FILE_SUFFIX, env_file)
        if flag_file is not None:
            if overrides.get(name) is not None:
                raise SettingsError(f"{flag} and {flag}-file: give one of them")
            values[name] = read_secret_file(f"{flag}-file", flag_file)
    for name, value in overrides.items():
        if value is not None:
            kind = next(f.type for f in fields(Settings) if f.name == name)
            values[name] = _convert(f"--{name.replace('_', '-')}", kind, value) if isinstance(value, str) else value
    settings = Settings(**values)
    _validate(settings)
    _last_read[:] = [tuple(upstream_read), tuple(ours_read)]
    return settings


def names_read(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(upstream variable names, MEMPHIS_GATEWAY_* names) that ``load`` read, for the start-up log."""
    del settings  # the names of the last load(): one per process
    return _last_read[0], _last_read[1]


def secret_warnings(settings: Settings) -> list[str]:
    """Warnings about secrets that work but are weak (any length is accepted, as upstream)."""
    out = []
    for name in ("jwt_secret", "upstream_jwt_secret", "upstream_refresh_jwt_secret"):
        value = getattr(settings, name)
        if value and len(value) < SHORT_SECRET:
            out.append(f"{name} is only {len(value)} characters: anyone who guesses it can forge tokens; "
                       f"use {SHORT_SECRET} or more random characters")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the help text names its environment variable and default."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if not isinstance(f.default, tuple) else ",".join(f.default)
        shown = "***" if f.metadata.get("secret") and default else default
        help_text = f"{f.metadata.get('help', '')} [env {ENV_PREFIX}{f.name.upper()}; default {shown!s}]"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
        if f.metadata.get("secret"):
            parser.add_argument(
                flag + "-file", dest=f.name + "_file", default=None, metavar="PATH",
                help=f"a file holding {f.name} (trailing newline stripped; prefer it to {flag}, which `ps` shows) "
                f"[env {ENV_PREFIX}{f.name.upper()}{FILE_SUFFIX}]",
            )


def secrets_given_as_flags(args: argparse.Namespace) -> list[str]:
    """The secret settings given on the command line in clear (every user of the machine sees them)."""
    return ["--" + name.replace("_", "-") for name in secret_fields() if getattr(args, name, None) is not None]


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    names = {f.name for f in fields(Settings)} | {name + "_file" for name in secret_fields()}
    return load(environ, {k: v for k, v in vars(args).items() if k in names})
