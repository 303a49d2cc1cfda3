#!/usr/bin/env bash
# The demo command (README): engine, install, build the sandbox images, run an MCP server
# in a hardened container and print its tools.
# Image builds trust STOCKADE_CA_BUNDLE, else the host's CA bundle (needed behind a
# TLS-intercepting proxy; harmless elsewhere). The bundle never reaches the final images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/docker-engine.sh
bash scripts/python-env.sh
ca="${STOCKADE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
args=()
[ -f "$ca" ] && args+=(--ca-bundle "$ca")
exec .venv/bin/stockade demo "${args[@]}"
