#!/usr/bin/env bash
# One entry point for a fresh machine: ./dev.sh serve | test | check | generate | bench
# Creates .venv (Python >= 3.11) on first use and installs the gateway into it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

venv() {
  if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
      # Debian ships venv separately; install it when we may.
      rm -rf .venv
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      else
        echo "python3 -m venv failed: install python3-venv (sudo apt-get install python3-venv)" >&2
        exit 1
      fi
      "$PY" -m venv .venv
    fi
  fi
  if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch .venv/.installed
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  serve) venv; exec .venv/bin/memphis-gateway serve "$@" ;;
  test) venv; exec .venv/bin/python -m pytest "$@" ;;
  check)
    venv
    .venv/bin/python -m gateway.protogen --check
    .venv/bin/buf lint
    .venv/bin/ruff check gateway tests bench
    .venv/bin/mypy gateway
    .venv/bin/lint-imports
    ;;
  generate) venv; exec .venv/bin/python -m gateway.protogen ;;
  bench) venv; exec .venv/bin/python bench/run.py "$@" ;;
  *) echo "usage: ./dev.sh serve|test|check|generate|bench [args]"; exit 2 ;;
esac
