#!/usr/bin/env bash
# The demo command (README): engine, install, build the sandbox images, start a daemon,
# register mcp-server-time, and call it with the official MCP client through
# `stockade connect` (mTLS, a sandbox per session).
# Image builds trust STOCKADE_CA_BUNDLE, else the host's CA bundle (needed behind a
# TLS-intercepting proxy; harmless elsewhere). The bundle never reaches the final images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/docker-engine.sh
bash scripts/python-env.sh demo
ca="${STOCKADE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
args=()
[ -f "$ca" ] && args+=(--ca-bundle "$ca")
exec .venv/bin/stockade demo "${args[@]}"
