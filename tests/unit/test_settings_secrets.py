"""Secrets from files, and the embedded broker's development password kept to loopback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway import settings as config
from gateway.settings import SettingsError, load


def parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


def test_secrets_from_env_files_trailing_newline_stripped(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret pw\n")
    (tmp_path / "jwt").write_text("j" * 40 + "\r\n")
    s = load({"MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE": str(tmp_path / "pw"),
              "MEMPHIS_GATEWAY_JWT_SECRET_FILE": str(tmp_path / "jwt")})
    assert s.root_password == "s3cret pw" and s.jwt_secret == "j" * 40


def test_secrets_from_flag_files_win_over_the_environment(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    args = parsed(["--root-password-file", str(tmp_path / "pw")])
    s = config.from_args(args, {"MEMPHIS_GATEWAY_ROOT_PASSWORD": "from-env"})
    assert s.root_password == "from-file"
    assert config.secrets_given_as_flags(args) == []
    assert config.secrets_given_as_flags(parsed(["--root-password", "x", "--jwt-secret", "y" * 40])) == [
        "--root-password", "--jwt-secret"]


@pytest.mark.parametrize("environ, argv, words", [
    ({"MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE": "/nonexistent/pw"}, [], "cannot read"),
    ({"MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE": "EMPTY"}, [], "is empty"),
    ({"MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE": "PW", "MEMPHIS_GATEWAY_ROOT_PASSWORD": "x"}, [], "set one of them"),
    ({}, ["--root-password", "x", "--root-password-file", "PW"], "give one of them"),
])
def test_bad_secret_files_are_clear_errors(tmp_path: Path, environ: dict[str, str], argv: list[str],
                                           words: str) -> None:
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "empty").write_text("\n")
    paths = {"PW": str(tmp_path / "pw"), "EMPTY": str(tmp_path / "empty")}
    environ = {k: paths.get(v, v) for k, v in environ.items()}
    argv = [paths.get(a, a) for a in argv]
    with pytest.raises(SettingsError, match=words):
        config.from_args(parsed(argv), environ)


@pytest.mark.parametrize("host, broker, password, refused", [
    ("0.0.0.0", "", "memphis", True),
    ("::", "", "memphis", True),
    ("10.1.2.3", "", "memphis", True),
    ("gateway.example", "", "memphis", True),
    ("127.0.0.1", "", "memphis", False),
    ("::1", "", "memphis", False),
    ("localhost", "", "memphis", False),
    ("0.0.0.0", "", "a-real-password", False),
    ("0.0.0.0", "memphis.internal:6666", "memphis", False),  # an external broker's password is its operator's
])
def test_development_password_only_on_loopback(host: str, broker: str, password: str, refused: bool) -> None:
    s = config.Settings(host=host, broker=broker, root_password=password)
    why = s.unsafe_embedded_password()
    assert (why is not None) == refused
    if why:
        assert "MEMPHIS_GATEWAY_ROOT_PASSWORD_FILE" in why and host in why
