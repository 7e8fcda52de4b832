"""Configuration: one typed settings object.

Sources, later ones winning: defaults, environment variables
(``MEMPHIS_GATEWAY_<FIELD>``, e.g. ``MEMPHIS_GATEWAY_HTTP_PORT=8080``), then command
line flags (``--http-port 8080``). A malformed value stops start-up with the
variable's name in the message.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "MEMPHIS_GATEWAY_"


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    # Listeners
    host: str = field(default="127.0.0.1", metadata={"help": "address both listeners bind (0.0.0.0 in containers)"})
    http_port: int = field(default=4444, metadata={"help": "REST port"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port"})
    workers: int = field(default=1, metadata={"help": "gateway processes sharing the ports (SO_REUSEPORT)"})
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
        default="memphis", metadata={"help": "broker root password (development default: memphis)", "secret": True}
    )
    broker_timeout_s: float = field(default=5.0, metadata={"help": "deadline of one broker operation (s)"})
    session_idle_s: float = field(default=300.0, metadata={"help": "close a user's broker connection unused this long"})
    # Tokens
    jwt_secret: str = field(
        default="",
        metadata={"help": "HS256 secret shared by replicas; generated (with a warning) if empty", "secret": True},
    )
    token_expiry_min: int = field(default=15, metadata={"help": "default access token lifetime (minutes)"})
    refresh_token_expiry_min: int = field(default=300, metadata={"help": "default refresh token lifetime (minutes)"})
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
    def answers_control_plane(self) -> bool:
        return self.embedded or self.control_plane

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


def _convert(name: str, kind: Any, raw: str) -> Any:
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
    for name in ("rate_limit_rps", "rate_limit_bytes_per_s"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name}: must be 0 (off) or positive")
    positive = (
        "workers", "max_streams_per_user", "broker_timeout_s", "token_expiry_min", "refresh_token_expiry_min",
        "request_timeout_s", "max_body_bytes", "max_batch_messages", "max_consume_batch", "max_consume_wait_ms",
        "session_idle_s", "http_keepalive_s", "http_send_timeout_s", "body_read_timeout_s", "max_inflight_body_bytes",
        "max_consume_bytes", "grpc_max_streams", "grpc_max_connection_age_s",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{name}: must be positive")
    if s.max_inflight_body_bytes < s.max_body_bytes:
        raise SettingsError("max_inflight_body_bytes: must be at least max_body_bytes")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError("log_level: must be DEBUG, INFO, WARNING or ERROR")
    if s.jwt_secret and len(s.jwt_secret) < 32:
        raise SettingsError("jwt_secret: must be at least 32 characters")


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the environment, then ``overrides`` (parsed CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        env_name = ENV_PREFIX + f.name.upper()
        if env_name in environ:
            values[f.name] = _convert(env_name, f.type, environ[env_name])
    for name, value in (overrides or {}).items():
        if value is not None:
            kind = next(f.type for f in fields(Settings) if f.name == name)
            values[name] = _convert(f"--{name.replace('_', '-')}", kind, value) if isinstance(value, str) else value
    settings = Settings(**values)
    _validate(settings)
    return settings


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


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    names = {f.name for f in fields(Settings)}
    return load(environ, {k: v for k, v in vars(args).items() if k in names})


def setting_names() -> Sequence[str]:
    return [f.name for f in fields(Settings)]
