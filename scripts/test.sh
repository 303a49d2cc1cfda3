#!/usr/bin/env bash
# The test command (README, .ci/run): engine, install, lint, types, then every test.
# Tests use the real Docker engine, real images and real MCP servers: no mocks of them.
# Extra arguments go to pytest, e.g. scripts/test.sh -k sandbox
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/docker-engine.sh
bash scripts/python-env.sh test
bash scripts/node-tools.sh
if ! command -v systemd-analyze >/dev/null; then  # the unit checks (tests/test_systemd.py)
  echo "test: installing Debian's systemd tools"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
# A real syslog collector with its TLS driver (tests/test_audit_witness.py)
if ! command -v rsyslogd >/dev/null || ! ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1; then
  echo "test: installing Debian's rsyslog with its TLS driver (a real syslog collector)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog rsyslog-gnutls >/dev/null
fi
if ! command -v git >/dev/null; then  # tests/test_sources.py makes a repository for mcp-server-git
  echo "test: installing git"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git >/dev/null
fi
if ! command -v docker-registry >/dev/null; then  # tests/test_image_pull.py pulls from one
  echo "test: installing Debian's docker-registry"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null
fi
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" && ruff check . && ruff format --check .
echo "== mypy --strict" && mypy
echo "== pytest" && pytest "$@"
