#!/usr/bin/env bash
# Install the Node-based test peers into .tools/node, without touching the system Node:
# Node 22 (the npm package `node`), the MCP Inspector and the MCP conformance suite.
# Pinned; skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=.tools/node
want="node@22.23.3 @modelcontextprotocol/inspector@2.12.0 @modelcontextprotocol/conformance@0.1.16"
stamp="$prefix/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "node-tools: npm is required (apt-get install npm)" >&2; exit 1; }
echo "node-tools: installing $want into $prefix" >&2
mkdir -p "$prefix"
# shellcheck disable=SC2086 # the package list is meant to split
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error $want >&2
"$prefix/node_modules/.bin/node" --version >/dev/null
echo "$want" >"$stamp"
