"""Upstream drop-in rules that need no process: variable names, Go booleans, Authorization, header names."""

from __future__ import annotations

import pytest

from gateway import settings as config
from gateway.auth.tokens import bearer
from gateway.core.errors import Unauthenticated
from gateway.core.headers import canonical


@pytest.mark.parametrize(("raw", "mode"), [
    ("1", "password"), ("t", "password"), ("T", "password"), ("TRUE", "password"), ("true", "password"),
    ("True", "password"), ("0", "token"), ("f", "token"), ("FALSE", "token"), ("False", "token"),
    ('"true"', "token"), ("yes", "token"), (" true", "token"), ("", "auto"),
])  # fmt: skip
def test_user_pass_based_auth_is_go_parsebool(raw: str, mode: str) -> None:
    assert config.load({"USER_PASS_BASED_AUTH": raw}).auth_mode == mode


def test_upstream_names_read_ours_win_empty_is_unset() -> None:
    s = config.load({"HTTP_PORT": "5555", "MEMPHIS_HOST": "memphis", "JWT_SECRET": "JWT_TEST_PURPOSE",
                     "MEMPHIS_GATEWAY_HTTP_PORT": "7777", "ROOT_USER": "", "DEV_ENV": "true"})
    assert (s.http_port, s.broker_url, s.root_user, s.dev_env) == (7777, "nats://memphis:6666", "root", True)
    assert s.jwt_secret == s.upstream_jwt_secret == "JWT_TEST_PURPOSE" and not s.embedded
    assert config.names_read(s) == (("HTTP_PORT", "MEMPHIS_HOST", "JWT_SECRET", "DEV_ENV"),
                                    ("MEMPHIS_GATEWAY_HTTP_PORT",))
    assert any("16 characters" in w for w in config.secret_warnings(s))
    assert config.load({"DEV_ENV": "True"}).dev_env is False  # upstream compares the string "true"
    assert config.load({"HTTP_PORT": "80x"}).http_port == 4444  # ignored (with a warning), as upstream


@pytest.mark.parametrize("value", ["Bearer tok", "Bearer: tok", "JWT tok", "bearer tok"])
def test_authorization_any_word(value: str) -> None:
    assert bearer(value) == "tok"


@pytest.mark.parametrize(("value", "why"), [
    (None, "no token"), ("", "no token"), ("tok", "malformed"), ("Bearer  tok", "malformed"),
    ("Bearer tok ", "malformed"),
])  # fmt: skip
def test_authorization_refused(value: str | None, why: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        bearer(value)
    assert info.value.why.startswith(why)


def test_header_names_canonical_as_fasthttp() -> None:
    assert canonical("x-example-id") == "X-Example-Id"
    assert canonical("HTTP2-Settings") == "Http2-Settings"
    assert canonical("X-DEBEZIUM-OP") == "X-Debezium-Op"
