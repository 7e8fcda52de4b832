#!/usr/bin/env bash
# One entry point for a fresh machine: ./dev.sh serve | test | check | generate | bench
# Creates .venv (Python >= 3.11) on first use and installs the gateway into it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# Debian packages the test suite drives (a real browser, the container build, load generators)
TEST_PACKAGES="chromium podman debootstrap iptables runc uidmap wrk nghttp2-client"

lock() {
  # serve and test started together must not both build .venv
  exec 9>.venv.lock
  if ! flock -n 9; then
    echo "dev.sh: another ./dev.sh is setting up .venv; waiting for it..." >&2
    flock 9
  fi
}

venv() {
  lock
  if [ ! -x .venv/bin/python ]; then
    echo "dev.sh: first run: creating .venv and installing the gateway and its tools (a minute or two)" >&2
    if ! "$PY" -m venv .venv 2>/dev/null; then
      # Debian ships venv separately; install it when we may.
      rm -rf .venv
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "dev.sh: installing python3-venv (apt-get)" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      else
        echo "python3 -m venv failed: install python3-venv (sudo apt-get install python3-venv)" >&2
        exit 1
      fi
      "$PY" -m venv .venv
    fi
  fi
  if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "dev.sh: installing the gateway into .venv (pip install -e .[dev])" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install --progress-bar on -q -e ".[dev]"
    touch .venv/.installed
  fi
  flock -u 9
}

test_packages() {
  # What the system tests need from Debian; installed when we may (root), else they say what is missing.
  local missing=""
  for p in $TEST_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  # the Node SDK test (npm install memphis-dev); by command: nodesource's nodejs bundles npm
  command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "dev.sh: installing what the system tests drive:$missing (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "dev.sh: not root: the system tests that need$missing will fail saying so (sudo apt-get install$missing)" >&2
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  serve) venv; exec .venv/bin/memphis-gateway serve "$@" ;;
  test) venv; test_packages; exec .venv/bin/python -m pytest "$@" ;;
  check)
    venv
    .venv/bin/python -m gateway.protogen --check
    .venv/bin/buf lint
    .venv/bin/ruff check gateway tests bench scripts
    .venv/bin/mypy gateway
    .venv/bin/lint-imports
    ;;
  generate) venv; exec .venv/bin/python -m gateway.protogen ;;
  bench) venv; exec .venv/bin/python bench/run.py "$@" ;;
  *) echo "usage: ./dev.sh serve|test|check|generate|bench [args]"; exit 2 ;;
esac
