"""The upstream Memphis REST gateway's environment variables, read as it reads them.

A deployment made for the upstream (its helm chart, its docker-compose) keeps working unchanged:
exactly these names, no prefix, an empty value counts as unset, numbers and booleans as Go parses
them (docs/upstream.md, "Configuration"). ``gateway.settings`` applies these first; our own
``MEMPHIS_GATEWAY_*`` variables and flags win over them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("gateway.settings")

# upstream name -> (our field, how the upstream parses it)
UPSTREAM_ENV: dict[str, tuple[str, str]] = {
    "HTTP_PORT": ("http_port", "int"),
    "MEMPHIS_HOST": ("broker", "str"),
    "USER_PASS_BASED_AUTH": ("auth_mode", "bool"),
    "ROOT_USER": ("root_user", "str"),
    "ROOT_PASSWORD": ("root_password", "str"),
    "CONNECTION_TOKEN": ("connection_token", "str"),
    "JWT_SECRET": ("upstream_jwt_secret", "str"),
    "REFRESH_JWT_SECRET": ("upstream_refresh_jwt_secret", "str"),
    "JWT_EXPIRES_IN_MINUTES": ("token_expiry_min", "int"),
    "REFRESH_JWT_EXPIRES_IN_MINUTES": ("refresh_token_expiry_min", "int"),
    "CLIENT_CERT_PATH": ("broker_tls_cert", "str"),
    "CLIENT_KEY_PATH": ("broker_tls_key", "str"),
    "ROOT_CA_PATH": ("broker_tls_ca", "str"),
    "DEV_ENV": ("dev_env", "str"),
    "DEBUG": ("log_level", "bool"),
}


def go_parse_bool(raw: str) -> bool:
    """Go's strconv.ParseBool: ValueError for anything but its twelve spellings."""
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"not a Go boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False): {raw!r}")


def _go_int(raw: str) -> int:
    """Go's strconv.ParseInt(raw, 10, 64): optional sign, decimal digits only."""
    digits = raw[1:] if raw[:1] in "+-" else raw
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"not a decimal integer: {raw!r}")
    return int(raw)


def upstream_values(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Our field values from the upstream's variables, and the names read (for the start-up log).

    A value that does not convert is ignored, as gonfig ignores it, but with a warning here."""
    values: dict[str, Any] = {}
    read: list[str] = []
    for name, (field_name, kind) in UPSTREAM_ENV.items():
        raw = environ.get(name, "")
        if raw == "":
            continue
        try:
            if kind == "int":
                value: Any = _go_int(raw)
            elif kind == "bool":
                value = go_parse_bool(raw)
            else:
                value = raw
        except ValueError as exc:
            if name == "USER_PASS_BASED_AUTH":
                values["auth_mode"] = "token"  # upstream: unparsable -> false -> connection-token mode
                log.warning("%s: %s; read as false (connection-token mode), as the upstream does", name, exc)
                read.append(name)
            else:
                log.warning("%s: %s; ignored, as the upstream ignores it", name, exc)
            continue
        read.append(name)
        if name == "USER_PASS_BASED_AUTH":
            value = "password" if value else "token"
        elif name == "DEBUG":
            if not value:
                continue
            value = "DEBUG"
        elif name == "DEV_ENV":
            value = raw == "true"
        elif name == "JWT_SECRET":
            values["jwt_secret"] = raw
        values[field_name] = value
    return values, read
